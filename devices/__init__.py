"""Hardware profiles and detection.

``devices/profiles/*.toml`` describe each kind of board and the ordered runtime candidates
to try on it (:mod:`devices.profile`); :mod:`devices.detect` decides which profile fits the
hardware a root filesystem shows. Nothing here imports a runtime or touches a device node:
detection only reads files, so it works unprivileged, inside the systemd sandbox, and on a
mounted SD-card image.
"""
