"""A bounded cache of recently used entries, for lookups that run once per message."""

from __future__ import annotations

import itertools
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class RecentCache(Generic[K, V]):
    """At most `size` entries, keeping the recently used ones (an approximate LRU).

    Two generations: a hit in the current one costs one dict lookup, with no bookkeeping (a
    strict LRU would reorder on every hit of the per-message path); a hit in the previous one
    moves the entry up. When the current generation holds half the size, it becomes the
    previous one and the old previous one is dropped: an entry survives while it is used at
    least once per half-size of other insertions.
    """

    __slots__ = ("_current", "_half", "_previous")

    def __init__(self, size: int) -> None:
        if size < 2:
            raise ValueError(f"a cache needs room for 2 entries or more, not {size}")
        self._half = size // 2
        self._current: dict[K, V] = {}
        self._previous: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        """The entry, or None when it is not (or no longer) cached."""
        value = self._current.get(key)
        if value is None and self._previous:
            value = self._previous.pop(key, None)
            if value is not None:
                self._add(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        """Cache an entry (replacing the one under the same key)."""
        if key in self._current:
            self._current[key] = value
            return
        self._previous.pop(key, None)
        self._add(key, value)

    def put_all(self, entries: dict[K, V]) -> None:
        """`put` of every entry, as one dict update (a generation turn first when they do not fit).

        A stale copy of a key in the previous generation is shadowed by the current one (`get`
        looks there first, `pop` drops both) and goes with it at the next turn. The turn comes
        a little early (the current generation may have had room for some): one `put` per entry
        cost ~0.5 us each, once per message when a commit's devices are mostly new (a fleet
        larger than the cache). More entries than half the size: the last ones are kept, and
        both generations are theirs: the current one could hold the older value of an entry not
        kept, which `get` would then answer (a stale index figure written back by the next
        commit of that device).
        """
        current, half = self._current, self._half
        count = len(entries)
        if len(current) + count <= half:
            current.update(entries)
            return
        if count <= half:
            self._previous = current
            self._current = dict(entries)
            return
        items = entries.items()
        self._previous = dict(itertools.islice(items, max(0, count - 2 * half), count - half))
        self._current = dict(itertools.islice(items, count - half, None))

    def _add(self, key: K, value: V) -> None:
        if len(self._current) >= self._half:
            self._previous, self._current = self._current, {}
        self._current[key] = value

    def pop(self, key: K) -> None:
        """Forget an entry (its stored value changed)."""
        self._current.pop(key, None)
        self._previous.pop(key, None)

    def clear(self) -> None:
        """Forget every entry."""
        self._current.clear()
        self._previous.clear()

    def items(self) -> list[tuple[K, V]]:
        """Every (key, entry) held now, each key once (the current generation's copy wins)."""
        return list({**self._previous, **self._current}.items())

    def __len__(self) -> int:
        """Entries held now (never more than the size)."""
        return len(self._current) + len(self._previous)


class FifoCache(Generic[K, V]):
    """At most `size` entries; when full, the oldest inserted eighth goes (first in, first out).

    One dict: a hit is one lookup with no bookkeeping, and an entry is never held twice (so no
    older copy can answer). For lookups that come round a fleet device by device, as telemetry
    does: any fleet up to `size` stays cached whole, where `RecentCache` (two generations of half
    the size each) keeps only what was used within the last half-size of insertions.
    """

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int) -> None:
        if size < 2:
            raise ValueError(f"a cache needs room for 2 entries or more, not {size}")
        self._size = size
        self._entries: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        """The entry, or None when it is not (or no longer) cached."""
        return self._entries.get(key)

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
