"""Event counts for the metrics that cannot be read off the bridge's state at scrape time.

Pure and thread-safe: ingest, restore and the transports each add with one call; `metrics`
reads a copy at each scrape. One process runs one bridge, so the counts are per process (as
Prometheus counters are).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass, field

# Commit time: a synced WAL write takes from well under a millisecond (tmpfs) to seconds (a
# failing disk); the upper buckets show a disk in trouble.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass(slots=True)
class Histogram:
    """Counts per upper bound (not cumulative; `metrics` sums them), plus sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def copy(self) -> Histogram:
        """A snapshot that later observations do not change."""
        twin = Histogram(self.bounds)
        twin.counts, twin.total = list(self.counts), self.total
        return twin


@dataclass(slots=True)
class Counts:
    """A consistent copy of the tally."""

    commit_seconds: Histogram
    batch_messages: Histogram
    restores: dict[str, int]
    restore_messages: int
    storage_stalls: int


class Tally:
    """The process's event counts (`TALLY`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commit = Histogram(COMMIT_BUCKETS)
        self._batch = Histogram(BATCH_BUCKETS)
        self._restores: dict[str, int] = {"done": 0, "error": 0}
        self._restore_messages = 0
        self._stalls = 0

    def committed(self, messages: int, seconds: float) -> None:
        """One group commit: how many messages it acknowledged, and how long it took."""
        with self._lock:
            self._commit.observe(seconds)
            self._batch.observe(messages)

    def restore_finished(self, outcome: str, messages: int) -> None:
        """A restore sent its terminal message (`done` or `error`) after `messages` messages."""
        with self._lock:
            self._restores[outcome] = self._restores.get(outcome, 0) + 1
            self._restore_messages += messages

    def storage_stalled(self) -> None:
        """Storage started failing (once per episode, not per retry)."""
        with self._lock:
            self._stalls += 1

    def counts(self) -> Counts:
        """A copy of everything, taken under the lock."""
        with self._lock:
            return Counts(
                self._commit.copy(),
                self._batch.copy(),
                dict(self._restores),
                self._restore_messages,
                self._stalls,
            )


TALLY = Tally()
