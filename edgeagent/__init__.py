"""edgeagent: the on-device agent and the core shared with the host tools.

The bundle format (:mod:`edgeagent.bundle`), signing keys, and the errors live here so
that a device needs nothing from :mod:`converter` or :mod:`fleet`.
"""

__version__ = "0.1.0"
