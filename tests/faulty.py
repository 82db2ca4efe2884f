"""Fault injection for the commit pipeline: a store wrapper, not a monkeypatched private method.

`Faults` is the switchboard a test keeps; `Faults.wrap` is the `Bridge(wrap_store=...)` seam, so
one switchboard can govern the stores of several bridges (a bridge restarted mid-fault):

    faults = Faults(failing=True)            # the disk is full from the start
    bridge = run_bridge(settings, wrap_store=faults.wrap)
    ...
    faults.failing = False                   # room again: the bridge resumes by itself
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from mqtt_backup.errors import StorageUnavailable
from mqtt_backup.ingest import PipelineStore
from mqtt_backup.storage import Pending

DISK_FULL = "IO error: No space left on device (injected)"


@dataclass
class Faults:
    """Switches read at every call (from the bridge's thread), and what the wrapped stores saw."""

    failing: bool = False  # writes raise StorageUnavailable, as rocksdict's full disk does
    failing_partitions: frozenset[str] = frozenset()  # these fail even when `failing` is off
    write_delay_s: float = 0.0  # a slow fsync: every write (failed or not) takes this long first
    reason: str = DISK_FULL
    calls: Counter[str] = field(default_factory=Counter)  # method name -> calls
    written: int = 0  # items the inner store took
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def wrap(self, store: PipelineStore) -> FaultyStore:
        """The `wrap_store` seam of `Bridge`: `store` governed by these switches."""
        return FaultyStore(store, self)

    def count(self, method: str, items: int = 0) -> None:
        """Note one call (and how many items got stored), safely from any thread."""
        with self._lock:
            self.calls[method] += 1
            self.written += items


class FaultyStore:
    """A `PipelineStore` that passes every call to a real store unless a switch says fail."""

    def __init__(self, inner: PipelineStore, faults: Faults | None = None) -> None:
        self.inner = inner
        self.faults = faults if faults is not None else Faults()

    def locate(self, device_id: str) -> tuple[str, bytes]:
        """Placement of the real store."""
        return self.inner.locate(device_id)

    def prepare(self, partition: str, items: Sequence[Pending]) -> object | None:
        """What the real store prepares."""
        return self.inner.prepare(partition, items)

    def write(
        self, partition: str, items: Sequence[Pending], prepared: object | None = None
    ) -> None:
        """Fail like a full disk while switched on (nothing stored); otherwise store."""
        f = self.faults
        if f.write_delay_s:
            time.sleep(f.write_delay_s)
        if f.failing or partition in f.failing_partitions:
            f.count("write_failed")
            raise StorageUnavailable(f"write to partition {partition} failed: {f.reason}")
        self.inner.write(partition, items, prepared)
        f.count("write", len(items))

    def open_partitions(self) -> None:
        """Reopen the real partitions (a full disk still opens: RocksDB reads the WAL)."""
        self.faults.count("open_partitions")
        self.inner.open_partitions()

    def close_partitions(self) -> None:
        """Close the real partitions."""
        self.faults.count("close_partitions")
        self.inner.close_partitions()
