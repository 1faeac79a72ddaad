"""What every command-line program here shares: argument parsing, logging and the error boundary.

A user error (bad flag, missing file, corrupt bundle) prints one line and exits non-zero;
only a bug prints a traceback. The global options (-v, --log-format) are accepted before or
after the sub-command. Exit codes and log formats are documented in docs/cli.md.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, Protocol, cast

from edgeagent import __version__
from edgeagent.cli.logformat import FORMATS, error_line, setup_logging
from edgeagent.errors import EdgeError, UsageError

log = logging.getLogger(__name__)

# Exit codes: 1 = the operation failed (verification refused a bundle, a run failed),
# 2 = the command line was wrong (argparse's own convention), 130 = interrupted.
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandModule(Protocol):
    """A module that adds one sub-command (or a group of them) to a program."""

    def register(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(prog: str, description: str, command_modules: Sequence[str]) -> argparse.ArgumentParser:
    """Build a parser whose sub-commands come from the named modules (each has ``register``).

    Command modules import their heavy dependencies lazily, inside the handler, so that
    building the parser (and ``--help``) stays fast and works on a device without host extras.
    """
    parser = _Parser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, top=True)
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser
    )
    subparsers.required = True
    for name in command_modules:
        module = cast(CommandModule, importlib.import_module(name))
        module.register(subparsers)
    for sub in _subparsers(parser):
        _add_global_options(sub, top=False)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # After the sub-command the options land in their own dest with SUPPRESS defaults, so a
    # sub-parser never resets what was given before it (`-v bundle verify -v` is -vv).
    parser.add_argument(
        "-v",
        "--verbose",
        dest="verbose" if top else "verbose_after",
        action="count",
        default=0 if top else argparse.SUPPRESS,
        help="more log output (-vv: debug)",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="auto" if top else argparse.SUPPRESS,
        help="log lines as text, journald (<N> priority prefixes) or JSON; auto: journald under "
        "systemd, else text",
    )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` (sub-commands and their actions), depth first."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                found += [sub, *_subparsers(sub)]
    return found


Handler = Callable[[argparse.Namespace], int | None]


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen handler, and turn errors into one line and an exit code."""
    args = parser.parse_args(argv)
    args.verbose += getattr(args, "verbose_after", 0)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    log_format = setup_logging(level, args.log_format)
    handler: Handler = args.handler
    try:
        rc = handler(args)
    except UsageError as exc:
        print(error_line(parser.prog, f"error: {exc}", log_format), file=sys.stderr)
        return EXIT_USAGE
    except EdgeError as exc:
        print(error_line(parser.prog, f"error: {exc}", log_format), file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(error_line(parser.prog, "interrupted", log_format), file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `edgectl bundle inspect X | head` closes stdout early; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return int(rc or 0)


def main_for(
    prog: str, description: str, command_modules: Sequence[str], argv: Sequence[str] | None = None
) -> NoReturn:
    """Entry point body shared by both programs."""
    sys.exit(run(build_parser(prog, description, command_modules), argv))
