"""Memory stays flat whatever the fleet size: the per-message caches are bounded.

The bound is tested as behaviour (entries held never exceed it; evicted entries read back
correctly), not by measuring the process's memory.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_backup import ingest as ingest_mod
from mqtt_backup.ingest import CommitPipeline
from mqtt_backup.keys import device_key
from mqtt_backup.placement import place
from mqtt_backup.records import Record, stored_flags
from mqtt_backup.storage import Pending, Store, StoreReader
from mqtt_backup.storage import partition as partition_mod
from mqtt_backup.storage.cache import FifoCache
from mqtt_backup.topics import Router, parse_template
from tests.conftest import examples

BASE_NS = 1_767_225_600 * 10**9
INDEX_BOUND = 16


def test_cache_never_holds_more_than_its_size() -> None:
    cache: FifoCache[int, str] = FifoCache(10)
    for n in range(1000):
        cache.put(n, str(n))
        assert len(cache) <= 10
    assert cache.get(999) == "999"
    assert cache.get(0) is None


def test_cache_size_must_leave_room() -> None:
    with pytest.raises(ValueError, match="room for 2"):
        FifoCache[int, int](1)


@pytest.fixture
def small_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the index cache so a few hundred devices overflow it."""
    monkeypatch.setattr(partition_mod, "INDEX_CACHE_ENTRIES", INDEX_BOUND)


def write_round(store: Store, devices: list[str], clock: int, size: int) -> int:
    """One message of `size` payload bytes per device, in batches of 50 as ingest would."""
    for start in range(0, len(devices), 50):
        groups: dict[str, list[Pending]] = {}  # one write per partition, in receive order
        for device in devices[start : start + 50]:
            clock += 1000
            partition, dev_key = store.locate(device)
            record = Record(f"devices/{device}/t", os.urandom(size))
            groups.setdefault(partition, []).append(Pending(device, dev_key, clock, record))
        for partition, group in groups.items():
            store.write(partition, group)
    return clock


@pytest.mark.usefixtures("small_caches")
def test_caches_stay_bounded_and_evicted_entries_read_back(data_dir: Path) -> None:
    devices = [f"dev-{n}" for n in range(600)]
    store = Store.open(data_dir, 3)
    try:
        clock = write_round(store, devices, BASE_NS, 10)
        for part in store.partitions.values():
            assert part.cached_entries <= INDEX_BOUND
        # A second round: every device's index entry was evicted and is read back from RocksDB.
        clock = write_round(store, devices, clock, 20)
        for part in store.partitions.values():
            assert part.cached_entries <= INDEX_BOUND
        placed = {d: store.locate(d)[0] for d in devices[:5]}
    finally:
        store.close()
    with StoreReader(data_dir) as reader:
        listed = {d.device: d for d in reader.devices()}
        assert len(listed) == len(devices)
        for device in devices:
            info = listed[device]
            msgs = list(reader.messages(device))
            assert info.count == len(msgs) == 2
            assert (info.first_ns, info.last_ns) == (msgs[0].ts_ns, msgs[1].ts_ns)
            assert [len(m.record.payload) for m in msgs] == [10, 20]
        weights = reader.manifest.weighted
    for device, partition in placed.items():
        assert partition == place(device_key(device), weights)


def index_after(data_dir: Path, batches: list[list[tuple[str, int, bool]]]) -> dict[bytes, bytes]:
    """Every stored index entry after writing `batches` of (device, payload size, dup)."""
    store = Store.open(data_dir, 2)
    try:
        clock = BASE_NS
        for batch in batches:
            groups: dict[str, list[Pending]] = {}
            for device, size, dup in batch:
                clock += 1000
                partition, dev_key = store.locate(device)
                record = Record(f"devices/{device}/t", b"x" * size, dup=dup)
                groups.setdefault(partition, []).append(Pending(device, dev_key, clock, record))
            for partition, group in groups.items():
                store.write(partition, group)
        return {
            key: entry.encode()
            for part in store.partitions.values()
            for key, entry in part.index_entries()
        }
    finally:
        store.close()


def test_index_entries_read_back_for_a_batch_add_up_as_cached_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Devices evicted from the index cache are read back all at once per batch, after the
    # batch's own figures were summed: a device seen several times in that batch, with
    # redelivered copies, a new device and a cached one must come out as with a cache that
    # never evicts.
    devices = [f"dev-{n}" for n in range(200)]
    batches = [
        [(d, 10, False) for d in devices],
        [(d, 5 + n % 7, n % 3 == 0) for n, d in enumerate(devices * 3)],
        [("new-one", 4, True), ("new-one", 6, False), *((d, 9, False) for d in devices[:40])],
        [(d, 3, True) for d in reversed(devices)],
    ]
    roomy = index_after(tmp_path / "roomy", batches)
    monkeypatch.setattr(partition_mod, "INDEX_CACHE_ENTRIES", INDEX_BOUND)
    evicting = index_after(tmp_path / "evicting", batches)
    assert len(roomy) == len(devices) + 1
    assert evicting == roomy


def test_the_route_map_stays_bounded_and_forgets_long_topics(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bounded by bytes and by topic length: a route holds its topic twice, and an MQTT topic may
    # be 65,535 bytes long, so a long one is routed afresh on each message, never remembered.
    budget = 8 * (ingest_mod.ROUTE_BYTES + 2 * len(b"devices/dev-1/t") + len("dev-1"))
    monkeypatch.setattr(ingest_mod, "ROUTE_MAP_BYTES", budget)
    store = Store.open(data_dir, 2)
    acked: list[object] = []
    router = Router([parse_template("devices/{device}/#")], "backup")
    pipeline = CommitPipeline(store, router, acked.extend)
    flag = stored_flags(1, retain=False, dup=False)
    long_topic = b"devices/dev-long/" + b"x" * ingest_mod.TOPIC_CACHE_BYTES
    offered = [*(f"devices/dev-{n}/t".encode() for n in range(20)), b"backup/own", long_topic]
    try:
        for n, topic in enumerate([*offered, long_topic]):
            before = pipeline.cached_routes
            pipeline.offer_publishes([topic], [b"p%d" % n], [flag], [n], BASE_NS + n)
            assert pipeline.cached_routes <= 8
            assert pipeline.route_bytes <= budget
            if topic == long_topic:
                assert pipeline.cached_routes == before
        assert pipeline.commit() == 22
    finally:
        store.close()
    assert acked == list(range(23))
    assert pipeline.counters.skipped == 1  # the bridge's own namespace: acknowledged unstored
    with StoreReader(data_dir) as reader:
        stored = list(reader.messages("dev-long"))
    assert [m.record.topic.encode() for m in stored] == [long_topic, long_topic]
    assert [m.record.payload for m in stored] == [b"p21", b"p22"]


def test_a_full_route_map_forgets_its_oldest_routes_only(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Telemetry comes round device by device: a map that emptied when full would miss on every
    # message of a fleet just larger than it. The oldest eighth goes; the rest stays routed.
    cost = ingest_mod.ROUTE_BYTES + 2 * len(b"devices/dev-100/t") + len("dev-100")
    monkeypatch.setattr(ingest_mod, "ROUTE_MAP_BYTES", 80 * cost)
    store = Store.open(data_dir, 2)
    pipeline = CommitPipeline(
        store, Router([parse_template("devices/{device}/#")], "b"), lambda _: None
    )
    topics = [f"devices/dev-{n}/t".encode() for n in range(100, 181)]  # one more than fit
    flag = stored_flags(1, retain=False, dup=False)
    try:
        for n, topic in enumerate(topics):
            pipeline.offer_publishes([topic], [b"p"], [flag], [n], BASE_NS + n)
        assert pipeline.cached_routes == 81 - 11  # 80 fitted; the 81st evicted 80 // 8 + 1
        assert pipeline.route_bytes == pipeline.cached_routes * cost
        kept = set(pipeline._routes)
        assert kept == set(topics[11:])
        located: list[str] = []
        monkeypatch.setattr(store, "locate", located.append)
        pipeline.offer_publishes(topics[11:], [b"p"] * 70, [flag] * 70, list(range(70)), BASE_NS)
        assert located == []  # every remembered route served without routing again
    finally:
        store.close()


@pytest.mark.parametrize("id_bytes", [10, 200])
@pytest.mark.parametrize("char", ["a", "\u00e9", "\u0800", "\U0001f600"])
def test_the_route_map_stays_within_its_budget_whatever_the_ids_characters(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, char: str, id_bytes: int
) -> None:
    # The estimate counts what a route's objects take, so a map full of ids of 1- to 4-byte
    # characters (a str stores 1, 2 or 4 bytes a character, behind a header of its kind) holds
    # what its budget says: counted in characters, such maps took 1.02-1.21x their budget.
    budget = 4 * 1024 * 1024
    monkeypatch.setattr(ingest_mod, "ROUTE_MAP_BYTES", budget)
    store = Store.open(data_dir, 1)
    pipeline = CommitPipeline(
        store, Router([parse_template("devices/{device}/#")], "b"), lambda _: None
    )
    stem = char * (id_bytes // len(char.encode()))  # topics within TOPIC_CACHE_BYTES
    try:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for n in range(30_000):  # enough to fill the budget and evict, whatever the chars
                pipeline._route(f"devices/{stem}{n}/t".encode())
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    finally:
        store.close()
    assert pipeline.route_bytes <= budget
    assert pipeline.cached_routes < 30_000  # it did evict
    assert held <= budget, f"{held / budget:.2f}x the budget"


@pytest.mark.parametrize("char", ["a", "\u00e9", "\u0800", "\U0001f600"])
def test_the_route_map_counts_a_new_route_as_its_eviction_frees_it(
    data_dir: Path, char: str
) -> None:
    # A new route's cost is summed inline (`_new_route`), its eviction subtracts `_route_cost`:
    # the two must agree, or the map's count drifts from what it holds (topics of ids of 1- to
    # 4-byte characters, an empty id, and topics not to be stored).
    store = Store.open(data_dir, 1)
    pipeline = CommitPipeline(
        store, Router([parse_template("devices/{device}/#")], "b"), lambda _: None
    )
    topics = [f"devices/{char * n}{n}/t".encode() for n in range(20)]
    topics += [b"devices//t", b"elsewhere/x", b"b/restore/x"]
    try:
        routes = [pipeline._route(topic) for topic in topics]
    finally:
        store.close()
    assert routes[-1] is None
    assert routes[-2] is None
    expected = sum(ingest_mod._route_cost(t, r) for t, r in zip(topics, routes, strict=True))
    assert pipeline.route_bytes == expected
    pipeline._evict_routes()  # the oldest eighth, at their `_route_cost`
    kept = list(pipeline._routes.items())
    assert pipeline.route_bytes == sum(ingest_mod._route_cost(t, r) for t, r in kept)


def test_a_commit_of_more_devices_than_half_the_cache_keeps_every_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A device written, then first in a commit of more devices than half the index cache, then
    # again: its index entry must count all three writes (verify compares it with the records).
    others = [f"dev-{n}" for n in range(4 * INDEX_BOUND)]
    batches = [
        [("dev-a", 10, False)],
        [("dev-a", 11, False), *((d, 12, False) for d in others)],
        [("dev-a", 13, False)],
    ]
    roomy = index_after(tmp_path / "roomy", batches)
    monkeypatch.setattr(partition_mod, "INDEX_CACHE_ENTRIES", INDEX_BOUND)
    evicting = index_after(tmp_path / "evicting", batches)
    assert evicting[device_key("dev-a")] == roomy[device_key("dev-a")]
    assert evicting == roomy


_CACHE_OPS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["put", "get", "pop"]), st.integers(0, 20)),
        st.tuples(st.just("put_all"), st.lists(st.integers(0, 20), max_size=14, unique=True)),
    ),
    max_size=60,
)


@settings(max_examples=examples(500), deadline=None)
@given(size=st.integers(2, 12), ops=_CACHE_OPS)
def test_the_fifo_cache_answers_the_latest_value_or_nothing(
    size: int, ops: list[tuple[str, int | list[int]]]
) -> None:
    """Whatever the puts, put_alls, gets and pops: never an older value of a key, never too many."""
    cache: FifoCache[int, int] = FifoCache(size)
    latest: dict[int, int] = {}
    for step, (op, arg) in enumerate(ops):
        if isinstance(arg, list):
            cache.put_all(dict.fromkeys(arg, step))
            latest.update(dict.fromkeys(arg, step))
        elif op == "put":
            cache.put(arg, step)
            latest[arg] = step
        elif op == "get":
            assert cache.get(arg) in (None, latest.get(arg))
        else:
            cache.pop(arg)
            latest.pop(arg, None)
        assert len(cache) <= size
    assert all(latest[key] == value for key, value in cache.items())


def test_the_fifo_cache_keeps_a_fleet_that_fits_and_forgets_its_oldest_eighth() -> None:
    # Telemetry comes round device by device: every device of a fleet up to the size stays
    # cached, however it comes round (two generations of half the size would keep only half).
    cache: FifoCache[int, int] = FifoCache(96)
    for round_ in range(3):
        for start in range(0, 96, 16):
            batch = range(start, start + 16)
            assert [cache.get(n) for n in batch] == [round_ - 1 if round_ else None] * 16
            cache.put_all(dict.fromkeys(batch, round_))
    assert len(cache) == 96
    cache.put(1000, 0)  # one more than fits: the oldest eighth (and the one over) go
    assert len(cache) == 96 - 12
    assert [n for n in range(96) if cache.get(n) is None] == list(range(13))
    with pytest.raises(ValueError, match="room for 2"):
        FifoCache[int, int](1)


class _CountingIndex:
    """An index column family that counts the device keys read from it."""

    def __init__(self, cf: Any) -> None:
        self._cf = cf
        self.read: list[bytes] = []

    def get(self, keys: Any) -> Any:
        self.read += keys if isinstance(keys, list) else [keys]
        return self._cf.get(keys)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cf, name)


def test_a_fleet_within_the_index_cache_is_never_read_back(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A one-partition store keeps the whole budget: 300 devices of a 384-entry budget, round
    # after round, have their index entries in memory (as lists in two generations of 192, they
    # were read back on every message), and the entries stay right.
    monkeypatch.setattr(partition_mod, "INDEX_CACHE_ENTRIES", 384)
    devices = [f"dev-{n}" for n in range(300)]
    store = Store.open(data_dir, 1)
    try:
        (part,) = store.partitions.values()
        counting = _CountingIndex(part._index_cf)
        monkeypatch.setattr(part, "_index_cf", counting)
        clock = write_round(store, devices, BASE_NS, 10)
        assert len(counting.read) == 300  # new devices: looked up once (bloom filters answer)
        for size in (20, 30):
            clock = write_round(store, devices, clock, size)
        assert len(counting.read) == 300
        assert part.cached_entries == 300
    finally:
        store.close()
    with StoreReader(data_dir) as reader:
        for info in reader.devices():
            msgs = list(reader.messages(info.device))
            assert info.count == len(msgs) == 3
            assert (info.first_ns, info.last_ns) == (msgs[0].ts_ns, msgs[-1].ts_ns)


def test_a_store_shares_the_index_cache_among_its_partitions(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The budget is per store, so memory does not grow with the partition count.
    monkeypatch.setattr(partition_mod, "INDEX_CACHE_ENTRIES", 64)
    devices = [f"dev-{n}" for n in range(400)]
    store = Store.open(data_dir, 4)
    try:
        write_round(store, devices, BASE_NS, 10)
        assert [p.cached_entries <= 16 for p in store.partitions.values()] == [True] * 4
    finally:
        store.close()
    assert partition_mod.index_cache_share(4) == 16
    assert partition_mod.index_cache_share(1) == 64
    assert partition_mod.index_cache_share(100) == 2
