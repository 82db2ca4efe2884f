"""A bounded cache for lookups that run once per message (the index cache of the write path)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class FifoCache(Generic[K, V]):
    """At most `size` entries; when full, the oldest inserted eighth goes (first in, first out).

    One dict: a hit is one lookup with no bookkeeping, and an entry is never held twice (so no
    older copy can answer). For lookups that come round a fleet device by device, as telemetry
    does: any fleet up to `size` stays cached whole, where the two-generation cache it replaced
    (half the size each) kept only what was used within the last half-size of insertions.
    """

    __slots__ = ("_entries", "_size", "get")

    def __init__(self, size: int) -> None:
        if size < 2:
            raise ValueError(f"a cache needs room for 2 entries or more, not {size}")
        self._size = size
        self._entries: dict[K, V] = {}
        # `get(key)`: the entry, or None when it is not (or no longer) cached. The dict's own
        # method (the dict is never replaced): a lookup per new device on the write path, where
        # a method around it cost a Python call more.
        self.get: Callable[[K], V | None] = self._entries.get

    def put(self, key: K, value: V) -> None:
        """Cache an entry (replacing the one under the same key, which keeps its age)."""
        self._entries[key] = value
        if len(self._entries) > self._size:
            self._evict()

    def put_all(self, entries: dict[K, V]) -> None:
        """`put` of every entry, as one dict update."""
        self._entries.update(entries)
        if len(self._entries) > self._size:
            self._evict()

    def _evict(self) -> None:
        """Drop the oldest entries: down to seven eighths of the size."""
        held = self._entries
        for key in list(itertools.islice(held, len(held) - self._size + self._size // 8)):
            del held[key]

    def pop(self, key: K) -> None:
        """Forget an entry (its stored value changed)."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()

    def items(self) -> list[tuple[K, V]]:
        """Every (key, entry) held now."""
        return list(self._entries.items())

    def __len__(self) -> int:
        """Entries held now (never more than the size)."""
        return len(self._entries)
