"""RocksDB's memory is bounded per process, not per partition or by what was written (issue 10).

Real RocksDB in temp dirs; what is checked is what RocksDB itself reports of its memtables and
block caches.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store
from mqtt_backup.storage.partition import BLOCK_CACHE_BYTES, MEMTABLE_BUDGET
from tests.conftest import wait_until

BASE_NS = 1_767_225_600 * 10**9
PAYLOAD = 32 * 1024
BATCH = 64


def memtables(store: Store) -> int:
    """Bytes in every memtable of every partition (mutable, and immutable not yet flushed)."""
    return sum(
        sum(part.family_figures("rocksdb.cur-size-all-mem-tables"))
        for part in store.partitions.values()
    )


def write_bytes(store: Store, total: int) -> None:
    """Messages of PAYLOAD bytes over many devices, through Store.write, until `total` bytes."""
    n = 0
    while n * PAYLOAD < total:
        by_part: dict[str, list[Pending]] = {}
        for _ in range(BATCH):
            n += 1
            device = f"dev-{n % 97}"
            partition, dev_key = store.locate(device)
            record = Record(f"devices/{device}/t", bytes([n % 251]) * PAYLOAD)
            by_part.setdefault(partition, []).append(Pending(device, dev_key, BASE_NS + n, record))
        for partition, items in by_part.items():
            store.write(partition, items)


def open_store(data: Path, reopened: bool) -> Store:
    """A new 4-partition store, or one closed and opened again (options from its OPTIONS file)."""
    store = Store.open(data, partitions=4)
    if reopened:
        store.close()
        store = Store.open(data, create=False)
    return store


@pytest.mark.parametrize("reopened", [False, True], ids=["new", "reopened"])
def test_memtables_of_all_partitions_stay_within_one_budget(tmp_path: Path, reopened: bool) -> None:
    store = open_store(tmp_path / "data", reopened)
    try:
        # Three budgets' worth, a quarter of it per partition: each partition alone stays under
        # RocksDB's default 64 MiB memtable, so only a budget shared by all of them flushes.
        write_bytes(store, 3 * MEMTABLE_BUDGET)
        wait_until(
            lambda: memtables(store) <= MEMTABLE_BUDGET,
            what=lambda: f"memtables at {memtables(store)} bytes, budget {MEMTABLE_BUDGET}",
        )
        assert sum(part.estimated_keys() for part in store.partitions.values()) > 0
    finally:
        store.close()


@pytest.mark.parametrize("reopened", [False, True], ids=["new", "reopened"])
def test_every_family_reads_through_the_one_block_cache(tmp_path: Path, reopened: bool) -> None:
    store = open_store(tmp_path / "data", reopened)
    try:
        write_bytes(store, MEMTABLE_BUDGET // 4)
        for part in store.partitions.values():
            for family in part.family_figures("rocksdb.block-cache-capacity"):
                assert family == BLOCK_CACHE_BYTES
        # One cache: whatever one partition reads shows in the usage every family reports.
        parts = list(store.partitions.values())
        for part in parts:
            part.reclaim([store.locate(f"dev-{n}")[1] for n in range(97)])  # flush to tables
        key = store.locate("dev-1")
        assert list(store.partitions[key[0]].scan(key[1]))
        usage = {u for part in parts for u in part.family_figures("rocksdb.block-cache-usage")}
        assert len(usage) == 1
        assert usage.pop() > 0
    finally:
        store.close()
