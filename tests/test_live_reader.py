"""Restores read through the writer's own handles (`LiveReader`), beside writes, moves and failures.

Real RocksDB in temp dirs; faults are injected only to hold a scan open at a chosen moment.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_backup.errors import StorageError
from mqtt_backup.keys import device_key
from mqtt_backup.placement import Weighted, place
from mqtt_backup.records import Record
from mqtt_backup.storage import Cursor, LiveReader, Pending, Store, StoredMessage, moves
from mqtt_backup.storage.partition import Partition
from mqtt_backup.storage.store import CHUNK_BYTES

BASE_NS = 1_700_000_000 * 10**9
MESSAGES = 300


def _write(store: Store, device: str, first: int, count: int) -> None:
    partition, dev_key = store.locate(device)
    items = [
        Pending(device, dev_key, BASE_NS + i, Record(f"d/{device}/t", b"%d" % i))
        for i in range(first, first + count)
    ]
    store.write(partition, items)


def _moving_device(store: Store, new: str) -> str:
    """A device that adding partition `new` (weight 1) moves onto it."""
    weighted = [*store.manifest.weighted, Weighted(new, 1.0)]
    for i in range(1000):
        device = f"dev-{i}"
        if place(device_key(device), weighted) == new:
            return device
    raise AssertionError("no device moves")


def _payloads(found: list[StoredMessage]) -> list[bytes]:
    return [m.record.payload for m in found]


def _read_all(reader: LiveReader, device: str, limit: int, reverse: bool = False) -> list[bytes]:
    cursor = Cursor(device, reverse=reverse)
    found: list[StoredMessage] = []
    while not cursor.done:
        found += reader.read(cursor, limit)
    return _payloads(found)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "data", partitions=3)
    yield opened
    opened.close()


def test_a_write_is_read_at_once_without_catching_up(store: Store) -> None:
    reader = LiveReader(store)
    _write(store, "dev-a", 0, 3)
    assert _read_all(reader, "dev-a", 64) == [b"0", b"1", b"2"]
    _write(store, "dev-a", 3, 1)  # acknowledged just before the next request
    assert _read_all(reader, "dev-a", 64)[-1] == b"3"


@pytest.mark.parametrize("reverse", [False, True])
def test_chunks_read_every_message_once_in_either_order(store: Store, reverse: bool) -> None:
    _write(store, "dev-a", 0, MESSAGES)
    _write(store, "dev-b", 0, 5)  # a neighbour in key order is never read
    expected = [b"%d" % i for i in range(MESSAGES)]
    got = _read_all(LiveReader(store), "dev-a", 7, reverse)
    assert got == (expected[::-1] if reverse else expected)


@pytest.mark.parametrize("limit", [1, 2, 3, 64])
def test_stray_keys_in_a_range_are_skipped_and_no_chunk_ends_it_early(
    store: Store, limit: int
) -> None:
    # Damage (tests/test_checks.py): keys of the wrong length among a device's records. They are
    # not messages; a chunk that met them is topped up, so a short chunk still means the end.
    _write(store, "dev-a", 0, 10)
    name, dev_key = store.locate("dev-a")
    records = store.partitions[name]._db  # the records family, raw
    keys = [
        key for key, _ in store.partitions[name].read_range(dev_key, None, None, False, None, 99)
    ]
    for key in keys[2], keys[5], keys[9]:
        records[key + b"!"] = b"not a record"  # longer: just after its record
        records[key[:24]] = b"not a record"  # shorter: just before it
    expected = [b"%d" % i for i in range(10)]
    for reverse in False, True:
        got = _read_all(LiveReader(store), "dev-a", limit, reverse)
        assert got == (expected[::-1] if reverse else expected)


def _neighbours(store: Store) -> tuple[str, str]:
    """Two devices of one partition, the second just after the first in key order."""
    homes: dict[str, list[tuple[bytes, str]]] = {}
    for i in range(200):
        name, dev_key = store.locate(f"dev-{i}")
        homes.setdefault(name, []).append((dev_key, f"dev-{i}"))
    crowded = max(homes.values(), key=len)
    (_, first), (_, second) = sorted(crowded)[:2]
    return first, second


def test_a_chunk_never_holds_another_devices_records(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: an item iterator that ignores its upper bound (as rocksdict's did when
    # its read options were dropped first) reads on into the next device's records.
    first, second = _neighbours(store)
    _write(store, first, 0, 10)
    _write(store, second, 100, 10)

    def unbounded(self: Partition, lower: bytes, _opts: object) -> Iterator[tuple[bytes, bytes]]:
        return self._db.items(from_key=lower)  # type: ignore[return-value]

    monkeypatch.setattr(Partition, "forward_items", unbounded)
    for limit in 3, 64:
        assert _read_all(LiveReader(store), first, limit) == [b"%d" % i for i in range(10)]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), max_size=40),
    limit=st.integers(1, 45),
    max_bytes=st.none() | st.integers(0, 20_000),
    skip=st.integers(0, 5),
)
def test_a_forward_chunk_holds_what_the_checked_scan_reads(
    one_store: Store, sizes: list[int], limit: int, max_bytes: int | None, skip: int
) -> None:
    # The fast path (the item iterator, taken a few records at a time under a byte budget)
    # stops exactly where the record-by-record scan does. Each example writes a device of its
    # own into one store (opening a store per example took most of 40 s).
    device = f"dev-{next(_EXAMPLES)}"
    name, dev_key = one_store.locate(device)
    items = [
        Pending(device, dev_key, BASE_NS + i, Record(f"d/{device}/t", b"x" * n))
        for i, n in enumerate(sizes)
    ]
    if items:
        one_store.write(name, items)
    part = one_store.partitions[name]
    keys = [k for k, _ in part.read_range(dev_key, None, None, False, None, 99)]
    after = keys[skip - 1] if 0 < skip <= len(keys) else None
    fast = part.read_range(dev_key, None, None, False, after, limit, max_bytes)
    checked = part._read_checked(dev_key, None, None, False, after, limit, max_bytes)
    assert fast == checked


_EXAMPLES = itertools.count()


@pytest.fixture(scope="module")
def one_store() -> Iterator[Store]:
    """A one-partition store the examples of a property test share (each its own device)."""
    with tempfile.TemporaryDirectory() as scratch:
        opened = Store.open(Path(scratch) / "data", partitions=1)
        try:
            yield opened
        finally:
            opened.close()


def test_a_restore_across_a_partition_add_reads_every_message_once(store: Store) -> None:
    device = _moving_device(store, "p-new")
    _write(store, device, 0, MESSAGES)
    reader = LiveReader(store)
    cursor = Cursor(device)
    first = reader.read(cursor, 100)  # from its old partition
    added = moves.add(store, "p-new")
    assert device in {m.device for m in added.moves.moves}
    rest: list[StoredMessage] = []
    while not cursor.done:
        rest += reader.read(cursor, 100)  # from the new one, resumed after the same key
    assert _payloads(first + rest) == [b"%d" % i for i in range(MESSAGES)]


def test_a_restore_racing_add_and_remove_reads_every_message_once(store: Store) -> None:
    device = _moving_device(store, "p-new")
    _write(store, device, 0, MESSAGES)
    reader = LiveReader(store)
    results: list[list[bytes]] = []
    stop = threading.Event()

    def restore_again_and_again() -> None:
        while not stop.is_set():
            results.append(_read_all(reader, device, 3))

    restoring = threading.Thread(target=restore_again_and_again)
    restoring.start()
    try:
        for _ in range(3):
            moves.add(store, "p-new")
            moves.remove(store, "p-new")
    finally:
        stop.set()
        restoring.join(30)
    expected = [b"%d" % i for i in range(MESSAGES)]
    assert results
    assert all(got == expected for got in results), [len(r) for r in results if r != expected]


def _held_scan(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Fault injection: the next scan stops after its first record until `go` is set.

    Both ways a chunk reads hold: the forward item iterator and the checked scan.
    """
    started, go = threading.Event(), threading.Event()

    def held(
        real: Callable[..., Iterator[tuple[bytes, bytes]]],
    ) -> Callable[..., Generator[tuple[bytes, bytes]]]:
        def scan(self: Partition, *args: object) -> Generator[tuple[bytes, bytes]]:
            for n, item in enumerate(real(self, *args)):  # the real iterator stays open
                yield item
                if n == 0 and not started.is_set():
                    started.set()
                    go.wait(10)

        return scan

    monkeypatch.setattr(Partition, "scan", held(Partition.scan))
    monkeypatch.setattr(Partition, "forward_items", held(Partition.forward_items))
    return started, go


def test_closing_the_handles_waits_for_the_chunk_under_way(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A live rocksdict iterator keeps its database open after close(): reopening it then fails
    # ("lock hold by current process"). A failed write's close and reopen wait for the chunk.
    _write(store, "dev-a", 0, 10)
    started, go = _held_scan(monkeypatch)
    reader = LiveReader(store)
    read: list[bytes] = []
    scanning = threading.Thread(target=lambda: read.extend(_read_all(reader, "dev-a", 100)))
    scanning.start()
    assert started.wait(10)
    reopened = threading.Event()

    def close_and_reopen() -> None:
        store.close_partitions()
        store.open_partitions()
        reopened.set()

    closing = threading.Thread(target=close_and_reopen)
    closing.start()
    assert not reopened.wait(0.3), "the handles closed under a live scan"
    go.set()
    scanning.join(10)
    closing.join(10)
    assert reopened.is_set()
    assert read == [b"%d" % i for i in range(10)]
    _write(store, "dev-a", 10, 1)  # the reopened handles write
    assert _read_all(reader, "dev-a", 100)[-1] == b"10"


def test_while_storage_failure_closed_the_handles_a_read_only_handle_serves(store: Store) -> None:
    _write(store, "dev-a", 0, 5)
    reader = LiveReader(store)
    store.close_partitions()  # what a failed write does (a full disk)
    assert _read_all(reader, "dev-a", 2) == [b"%d" % i for i in range(5)]
    store.open_partitions()  # storage is back: the writer's handles serve again
    _write(store, "dev-a", 5, 1)
    assert _read_all(reader, "dev-a", 2)[-1] == b"5"
    store.close_partitions()  # failing again: a fresh read-only handle sees the new write
    assert _read_all(reader, "dev-a", 100)[-1] == b"5"
    reader.close()


def _write_big(store: Store, device: str, count: int, size: int) -> list[bytes]:
    partition, dev_key = store.locate(device)
    payloads = [bytes([i]) * size for i in range(count)]
    items = [
        Pending(device, dev_key, BASE_NS + i, Record(f"d/{device}/t", p))
        for i, p in enumerate(payloads)
    ]
    store.write(partition, items)
    return payloads


def test_a_chunk_of_big_values_stops_at_its_byte_budget(store: Store) -> None:
    # Counted in records alone, a chunk of 512 one-MB payloads held half a GB per restore.
    size = CHUNK_BYTES // 4 + 1
    payloads = _write_big(store, "dev-big", 12, size)
    reader = LiveReader(store)
    cursor = Cursor("dev-big")
    first = reader.read(cursor, 512)
    assert len(first) == 4  # the fourth value passes the budget: the chunk ends there
    ended_early = not cursor.done
    rest: list[StoredMessage] = []
    while not cursor.done:
        rest += reader.read(cursor, 512)
    assert ended_early
    assert _payloads(first + rest) == payloads  # everything, once, in order
    assert _read_all(reader, "dev-big", 512, reverse=True) == payloads[::-1]


def test_a_value_larger_than_the_budget_still_reads(store: Store) -> None:
    payloads = _write_big(store, "dev-huge", 3, CHUNK_BYTES + 1)
    reader = LiveReader(store)
    cursor = Cursor("dev-huge")
    assert _payloads(reader.read(cursor, 512)) == payloads[:1]  # at least one record a chunk
    assert _read_all(reader, "dev-huge", 512) == payloads


def _read_only_opened(monkeypatch: pytest.MonkeyPatch) -> list[Partition]:
    """A spy: every read-only handle opened from now on (the real one, only recorded)."""
    opened: list[Partition] = []
    real = Partition.open_reader

    def spy(name: str, path: Path, secondary: Path | None = None) -> Partition:
        part = real(name, path, secondary)
        opened.append(part)
        return part

    monkeypatch.setattr(Partition, "open_reader", spy)
    return opened


def _is_closed(part: Partition) -> bool:
    try:
        part.read_range(device_key("dev-a"), None, None, False, None, 1)
    except Exception as exc:  # noqa: BLE001 - rocksdict's DbClosedError is what counts
        return "closed" in str(exc)
    return False


def test_the_read_only_handle_goes_when_the_writer_reopens(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kept until the next read, it outlived the stall and pinned table files a prune or forget
    # deletes (the disk they were to free stayed full).
    _write(store, "dev-a", 0, 5)
    opened = _read_only_opened(monkeypatch)
    reader = LiveReader(store)
    store.close_partitions()  # what a failed write does (a full disk)
    assert _read_all(reader, "dev-a", 100) == [b"%d" % i for i in range(5)]
    assert len(opened) == 1
    assert not _is_closed(opened[0])
    store.open_partitions()  # storage is back; no restore reads after it
    assert _is_closed(opened[0])
    assert _read_all(reader, "dev-a", 100) == [b"%d" % i for i in range(5)]
    assert len(opened) == 1  # read through the writer's handles again


def test_a_chunk_after_the_close_opens_no_handle(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A chunk queued in the default executor can run after the shutdown closed the reader and
    # the store's handles: a read-only handle opened then was never closed.
    _write(store, "dev-a", 0, 5)
    opened = _read_only_opened(monkeypatch)
    reader = LiveReader(store)
    reader.close()
    store.close_partitions()  # store.close() at shutdown
    with pytest.raises(StorageError, match="closed"):
        reader.read(Cursor("dev-a"), 64)
    assert opened == []


def test_a_chunk_after_the_store_closed_opens_no_handle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.open(tmp_path / "data", partitions=3)
    _write(store, "dev-a", 0, 5)
    opened = _read_only_opened(monkeypatch)
    reader = LiveReader(store)
    store.close_partitions()
    assert len(_read_all(reader, "dev-a", 100)) == 5  # a read-only handle serves meanwhile
    store.close()  # without the reader's close: its handle goes all the same
    assert len(opened) == 1
    assert _is_closed(opened[0])
    with pytest.raises(StorageError, match="closed"):
        reader.read(Cursor("dev-a"), 64)
    assert len(opened) == 1
