"""What every command-line program here shares: argument parsing and the error boundary.

A user error (bad flag, missing file, corrupt bundle) prints one line and exits non-zero;
only a bug prints a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, Protocol, cast

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
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser
    )
    subparsers.required = True
    for name in command_modules:
        module = cast(CommandModule, importlib.import_module(name))
        module.register(subparsers)
    return parser


Handler = Callable[[argparse.Namespace], int | None]


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen handler, and turn errors into one line and an exit code."""
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    handler: Handler = args.handler
    try:
        rc = handler(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EdgeError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
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
