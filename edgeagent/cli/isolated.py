"""Run one job in a fresh process with a time limit, and get back plain data or a reason.

``edgeagent bench`` runs each candidate in its own process so that its peak RSS is its own.
A ``multiprocessing.Pool`` is the wrong tool for that: an exception that cannot be
unpickled kills the pool's result thread and the parent waits for ever, a worker that
crashes (a delegate's segfault) or hangs (a TensorRT build that never ends) does the same.
Here every job gets its own spawned process and a pipe; the child sends back either the
job's result (plain data: dicts, strings, numbers) or a one-line error, and the parent
waits at most ``timeout_s`` before it kills the child.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from edgeagent.errors import EdgeError


@dataclass(frozen=True)
class Outcome:
    """What came back: ``result`` when the job returned, else ``error`` (one line)."""

    result: Any = None
    error: str | None = None


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: the message of our own errors, ``Type: message`` for anything else."""
    text = str(exc) if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def _child(conn: Connection, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        message: tuple[str, Any] = ("ok", func(*args))
    except Exception as exc:  # every failure goes back as data, never as a pickled exception
        message = ("error", one_line(exc))
    try:
        conn.send(message)
    except Exception as exc:  # the result itself does not pickle: say so instead of hanging
        conn.send(("error", f"result cannot be sent back ({one_line(exc)})"))
    finally:
        conn.close()


def run_isolated(func: Callable[..., Any], args: tuple[Any, ...], *, timeout_s: float) -> Outcome:
    """Run ``func(*args)`` in a fresh spawned process; wait at most ``timeout_s`` seconds.

    ``func`` must be importable by name (a module-level function) and ``args`` picklable.
    A child that times out is killed; one that dies without answering is reported with its
    exit status. Never raises for what happens in the child.
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(sender, func, args), daemon=True)
    process.start()
    sender.close()  # the child holds the only writer: EOF on the pipe means it is gone
    try:
        if not receiver.poll(timeout_s):
            return Outcome(error=f"timed out after {timeout_s:g} s (raise --timeout)")
        try:
            kind, payload = receiver.recv()
        except EOFError:
            process.join(timeout=5)
            return Outcome(error=f"worker died without an answer ({_exit_reason(process.exitcode)})")
        return Outcome(result=payload) if kind == "ok" else Outcome(error=payload)
    finally:
        receiver.close()
        if process.is_alive():
            process.kill()
        process.join()
        process.close()


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"
