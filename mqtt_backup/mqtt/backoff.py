"""One backoff for every retry loop: broker reconnects (ingest, restore) and storage stalls.

0.5 s first, doubling up to MAX_S, each delay drawn within +-20 % so that a fleet of bridges
restarted together (or ingest and restore of one bridge) do not retry in step.
"""

from __future__ import annotations

import random

FIRST_S = 0.5
MAX_S = 30.0  # read at each step: the tests turn it down
JITTER = 0.2


class Backoff:
    """The delays of one retry loop; `reset()` once what it retried worked."""

    def __init__(self) -> None:
        self._base = FIRST_S

    def next(self) -> float:
        """The delay to wait now (with jitter); the one after grows."""
        delay = min(self._base, MAX_S) * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311
        self._base = min(self._base * 2, MAX_S)
        return delay

    def reset(self) -> None:
        """Back to the first delay."""
        self._base = FIRST_S
