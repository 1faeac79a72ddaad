"""One line that names every problem of a pydantic validation error, not only the first."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


def problems(exc: ValidationError, prefix: str = "", known: Iterable[str] | None = None) -> str:
    """Every problem in ``exc`` as ``where: reason``, joined by '; ', unknown keys first.

    A typo (``sparsty``) shows up as an unknown key *and* a missing field; naming both, the
    unknown key first, points at the line the user typed. ``known`` (the model's fields) is
    listed after an unknown top-level key; ``prefix`` goes before every location.
    """
    unknown: list[str] = []
    other: list[str] = []
    fields = ", ".join(known) if known is not None else ""
    for error in exc.errors():
        loc = [prefix] if prefix else []
        loc += [str(part) for part in error["loc"]]
        if error["type"] == "extra_forbidden" and loc:
            parent = ".".join(loc[:-1])
            hint = f" (known: {fields})" if fields and len(error["loc"]) == 1 else ""
            unknown.append(f"{parent + ': ' if parent else ''}unknown key {loc[-1]!r}{hint}")
            continue
        reason = error["msg"].removeprefix("Value error, ")
        where = ".".join(loc)
        other.append(f"{where}: {reason}" if where else reason)
    return "; ".join(unknown + other)
