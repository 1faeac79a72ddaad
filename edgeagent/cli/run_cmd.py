"""``edgeagent run``: the agent as a long-running service (what systemd starts)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent.defaults import CONFIG_ENV, DEFAULT_CONFIG_PATH

if TYPE_CHECKING:  # pydantic: imported by the handler, not at --help time
    from edgeagent.config import AgentConfig

log = logging.getLogger(__name__)

EXIT_BUG = 70  # EX_SOFTWARE: systemd's Restart=always brings the agent back into its journal

EPILOG = f"""\
The configuration comes from --config, else ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH}
(missing default file = defaults), then EDGEAGENT_<SETTING> environment variables.
Under systemd (Type=notify) the agent reports READY=1, a STATUS= line with each model's
active bundle (and each deployment step while one runs), WATCHDOG=1 pings and STOPPING=1;
from a shell it simply runs until Ctrl-C. One agent per state folder: a second one exits
with a one-line reason. Run as root outside systemd it warns (it needs no privileges).

With broker_url set, the agent reconciles the desired state published for this device and
its groups, downloads bundles from the registry in resumable blocks, verifies them, proves
them on the golden set, and switches over (rolling back on any failure). It always serves
the installed models on socket_path.

examples:
  edgeagent run
  edgeagent run --config ./agent.toml -v
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the agent service (what the systemd unit starts)",
        description="Run the on-device agent until SIGTERM or Ctrl-C.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="agent.toml to read")
    parser.set_defaults(handler=_run)


def _say_what_runs(explicit: Path | None, config: AgentConfig) -> None:
    """Log where the settings came from and the broker, loudly when there is no file or broker."""
    path = explicit or Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
    broker = config.broker_url or "none (no deployments or telemetry until broker_url is set)"
    if not path.is_file():
        log.warning(
            "no config file at %s: running with the defaults (device %s, broker %s, socket %s)",
            path,
            config.device_id,
            broker,
            config.socket_path,
        )
    elif config.broker_url is None:
        log.warning("config %s: broker %s; serving installed models on %s", path, broker, config.socket_path)
    else:
        log.info("config %s: device %s, broker %s", path, config.device_id, broker)


def _run(args: argparse.Namespace) -> int:
    from devices.detect import detect
    from edgeagent.config import load_config
    from edgeagent.service import AgentService

    config = load_config(args.config)
    if not args.verbose:  # -v on the command line wins over the file
        logging.getLogger().setLevel(config.log_level)
    _say_what_runs(args.config, config)
    detection = detect(config.detect_root, override=config.profile, profiles_dir=config.profiles_dir)
    log.info(
        "device %s: profile %s (%s: %s); candidates %s",
        config.device_id,
        detection.profile,
        detection.source,
        detection.reason,
        ", ".join(str(c) for c in detection.candidates),
    )
    for note in detection.notes:
        log.warning("%s", note)
    from edgeagent.agent import Agent
    from edgeagent.statelock import state_lock

    _warn_if_root()
    with state_lock(config.state_dir):
        service = AgentService(config, detection)
        agent = Agent(
            config,
            detection,
            on_fatal=lambda reason: service.stop.request(
                f"deployment engine bug: {reason}", exit_code=EXIT_BUG
            ),
        ).start()
        try:
            return service.run()
        finally:
            agent.close()


def _warn_if_root() -> None:
    """Warn (not refuse: demos and bench boards run it as root) outside systemd's unit."""
    # INVOCATION_ID is set by systemd for every unit it starts; the unit runs as 'edgeagent'.
    if os.geteuid() == 0 and not os.environ.get("INVOCATION_ID"):
        log.warning(
            "running as root outside systemd: the agent needs no privileges; "
            "use the edgeagent user (edgeagent install-service) in production"
        )
