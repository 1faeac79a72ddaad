"""Which failures are worth another try, and when.

A *transient* failure may go away by itself (the registry lost a block, the broker was
down, a disk was full): the same document is tried again after a backoff with jitter, up to
``max_attempts`` starts in all. A *deterministic* failure gives the same answer every time
(a bad signature, a model that misses its gate, a downgrade): the document is not tried
again; a newer document, or ``edgectl command refresh``, asks again on purpose.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass


class Kind(str, enum.Enum):
    TRANSIENT = "transient"
    DETERMINISTIC = "deterministic"


# Reason codes (errors.py's ``code`` of each failure, plus the engine's own) that may
# succeed on a later try. Everything else is deterministic: retrying a verdict is a loop.
TRANSIENT_CODES = frozenset(
    {
        "transfer_failed",
        "hash_mismatch",  # the registry served other bytes under this id; another replica may not
        "size_mismatch",
        "truncated",
        "not_found",  # the registry does not have the bundle (yet)
        "timeout",
        "no_broker",
        "insufficient_space",
        "io_error",
        "store_corrupt",
    }
)


def kind_of(code: str) -> Kind:
    return Kind.TRANSIENT if code in TRANSIENT_CODES else Kind.DETERMINISTIC


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: try n waits uniform(0.5, 1) x min(cap, base x 2^(n-1)) s."""

    base_s: float = 10.0
    cap_s: float = 600.0
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.cap_s < self.base_s or self.max_attempts < 1:
            raise ValueError("backoff needs 0 < base_s <= cap_s and max_attempts >= 1")

    def delay_s(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the ``attempts``-th failed start (1-based)."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** max(0, attempts - 1))
        # Half fixed, half random: devices that failed together do not retry together.
        return ceiling * (0.5 + 0.5 * rand())
