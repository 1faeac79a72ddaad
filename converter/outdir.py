"""The converter's output folder: never mixed with an earlier run, never left half-written."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from edgeagent.errors import UsageError

#: What marks a folder as an earlier conversion's, so that ``--force`` may replace its contents.
MARKERS = ("report.json", "artifacts")


@contextlib.contextmanager
def fresh_output(out: Path, *, force: bool) -> Iterator[None]:
    """Hold ``out`` empty for one conversion; on any failure remove what the run wrote.

    An existing folder must be empty, or (with ``force``) an earlier conversion's, whose contents
    are removed first: two runs' artifacts never share a folder. A folder of other files is
    refused even with ``force``, so a mistyped ``-o`` cannot empty a home directory.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    created = not out.exists()
    if not created and any(out.iterdir()):
        if not force:
            raise UsageError(
                f"{out} is not empty; give a new folder, or --force to replace an earlier conversion"
            )
        if not any((out / marker).exists() for marker in MARKERS):
            raise UsageError(
                f"{out} is not empty and holds no earlier conversion (no report.json or artifacts/); "
                "not replacing its files, even with --force"
            )
        _empty(out)
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            _empty(out)
        raise


def _empty(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
