"""Long operations cut into units that a commit may come between.

An operation (a partition move, a prune, a forget) is a generator: it yields where a commit of
ingest may come in, and returns its result. Each stretch of work between two yields (a unit)
runs with nothing else writing to the store; between units the running bridge stores and
acknowledges what it received meanwhile (docs/design-notes.md, "Operations run by the writer"),
on either transport. Offline the units simply run one after the other (`to_the_end`).

A unit is about UNIT_KEYS records copied, deleted or scanned (at least one device), so that
acknowledgements wait for one unit, not for the whole operation.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

_R = TypeVar("_R")

# Records per unit. A module setting, read at every unit: tests make it small, so that a small
# store takes many units.
UNIT_KEYS = 10_000

Units: TypeAlias = Generator[None, None, _R]


@dataclass(frozen=True, slots=True)
class Done(Generic[_R]):
    """The last unit ran: the operation's result."""

    result: _R


def step(units: Units[_R]) -> Done[_R] | None:
    """Run the next unit; None when more follow, else the result."""
    try:
        next(units)
    except StopIteration as stop:
        return Done(stop.value)
    return None


def to_the_end(units: Units[_R]) -> _R:
    """Run every unit, one after the other (offline, and a final unit's own catch-up)."""
    while True:
        done = step(units)
        if done is not None:
            return done.result


class Budget:
    """Counts the records of the unit under way; `spent` says when to yield."""

    def __init__(self) -> None:
        self.used = 0

    def spend(self, records: int) -> bool:
        """Count records (a device is at least 1); whether the unit is full (and start anew)."""
        self.used += max(records, 1)
        if self.used < UNIT_KEYS:
            return False
        self.used = 0
        return True

    @property
    def left(self) -> int:
        """Records the unit may still take (at least 1)."""
        return max(UNIT_KEYS - self.used, 1)
