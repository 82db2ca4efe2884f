"""The partitioned store on a real RocksDB in temp dirs: writes, reads, clock, lock, faults."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from rocksdict import Rdict

from mqtt_backup.errors import (
    EXIT_STORAGE,
    EXIT_USAGE,
    CorruptRecord,
    DataDirLocked,
    DataDirMissing,
    StorageError,
    StorageUnavailable,
    UsageError,
)
from mqtt_backup.ingest import CommitPipeline
from mqtt_backup.keys import KEY_LEN
from mqtt_backup.records import Properties, Record, encode_record
from mqtt_backup.storage import Pending, Store, StoredMessage, StoreReader
from mqtt_backup.storage.journal import BridgeState, Gap, GapLog
from mqtt_backup.storage.manifest import MANIFEST, Manifest, load_manifest
from mqtt_backup.storage.partition import Partition
from mqtt_backup.topics import Router, parse_template

BASE_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
DISK_FULL = "IO error: No space left on device"


# ---- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    """A new 3-partition store, closed after the test."""
    opened = Store.open(data_dir, 3)
    yield opened
    opened.close()


def pending(store: Store, device: str, received_ns: int, record: Record) -> Pending:
    """A Pending for `device`, placed the way the ingest pipeline places it."""
    _, dev_key = store.locate(device)
    return Pending(device, dev_key, received_ns, record)


def write(store: Store, device: str, items: Sequence[tuple[int, Record]]) -> None:
    """Store (received_ns, record) pairs of one device in one batch."""
    partition, _ = store.locate(device)
    store.write(partition, [pending(store, device, ns, rec) for ns, rec in items])


def read(data_dir: Path, device: str, **query: Any) -> list[StoredMessage]:
    """One device's messages through a fresh read-only handle."""
    with StoreReader(data_dir) as reader:
        return list(reader.messages(device, **query))


def rec(n: int, device: str = "dev-1", **changes: Any) -> Record:
    """A small numbered record of a device."""
    return dataclasses.replace(Record(f"devices/{device}/t", f"m{n}".encode()), **changes)


def stored_size(msg: StoredMessage) -> int:
    """What the index counts for one stored message: key plus encoded value."""
    return KEY_LEN + len(encode_record(msg.record, msg.ts_ns))


def partition_of(store: Store, device: str) -> Partition:
    """The open partition that holds a device."""
    return store.partitions[store.locate(device)[0]]


# ---- opening and the manifest -------------------------------------------------------------------


def test_open_creates_manifest_and_partitions(data_dir: Path) -> None:
    store = Store.open(data_dir, 3)
    try:
        assert (data_dir / MANIFEST).is_file()
        assert [p.name for p in store.manifest.partitions] == ["p0", "p1", "p2"]
        assert sorted(store.partitions) == ["p0", "p1", "p2"]
        for spec in store.manifest.partitions:
            assert (spec.directory(data_dir) / "CURRENT").is_file()
        assert store.client_id.startswith("mqtt-backup-")
    finally:
        store.close()


def test_reopen_keeps_client_id_and_partitions(data_dir: Path) -> None:
    first = Store.open(data_dir, 3)
    client_id, specs = first.client_id, first.manifest.partitions
    first.close()
    for partitions in (None, 3):
        again = Store.open(data_dir, partitions)
        try:
            assert again.client_id == client_id
            assert again.manifest.partitions == specs
        finally:
            again.close()


def test_partition_count_mismatch_is_a_usage_error(data_dir: Path) -> None:
    Store.open(data_dir, 3).close()
    with pytest.raises(UsageError) as caught:
        Store.open(data_dir, 5)
    assert caught.value.exit_code == EXIT_USAGE
    assert "partitions add/remove" in caught.value.message()
    assert "3 partitions" in caught.value.message()
    # The failed open let go of the lock.
    Store.open(data_dir).close()


def test_client_id_given_later_is_kept_once_it_connected(data_dir: Path) -> None:
    Store.open(data_dir, 3).close()
    first = load_manifest(data_dir).client_id
    Store.open(data_dir, client_id="typo").close()  # e.g. the broker refused: not kept
    assert load_manifest(data_dir).client_id == first
    taken = Store.open(data_dir, client_id="bridge-a")
    taken.keep_client_id()  # the bridge calls this after a successful connect
    taken.close()
    assert load_manifest(data_dir).client_id == "bridge-a"
    again = Store.open(data_dir)
    try:
        assert again.client_id == "bridge-a"
    finally:
        again.close()


def test_new_store_takes_the_client_id_given(data_dir: Path) -> None:
    Store.open(data_dir, 2, client_id="given").close()
    assert load_manifest(data_dir).client_id == "given"


# ---- writing and reading ------------------------------------------------------------------------

PAYLOADS = [
    b"",
    b"\x00",
    bytes(range(256)),
    b'{"t": 21.5}',
    "caf\u00e9 \u2603".encode(),
    b"\xff\xfe\x00\x01 not utf-8",
    os.urandom(300_000),
]


def test_payloads_and_metadata_come_back_byte_exact_in_order(store: Store, data_dir: Path) -> None:
    props = Properties(
        payload_format=1,
        message_expiry=60,
        content_type="application/json",
        response_topic="r/1",
        correlation_data=b"\x00\x01",
        user=(("k", "v"), ("k", "v2")),
    )
    records = [
        Record(f"devices/dev-1/p{i}", payload, qos=i % 2, retain=i == 1, dup=i == 2)
        for i, payload in enumerate(PAYLOADS)
    ]
    records.append(Record("devices/dev-1/props", b"x", properties=props))
    write(store, "dev-1", [(BASE_NS + i, r) for i, r in enumerate(records)])
    got = read(data_dir, "dev-1")
    assert [m.record for m in got] == records
    assert [m.ts_ns for m in got] == [BASE_NS + i for i in range(len(records))]
    assert all(m.device == "dev-1" for m in got)


def test_devices_are_kept_apart(store: Store, data_dir: Path) -> None:
    for n in range(20):
        device = f"dev-{n % 4}"
        write(store, device, [(BASE_NS + n, rec(n, device))])
    for d in range(4):
        got = read(data_dir, f"dev-{d}")
        assert [m.record.payload for m in got] == [f"m{n}".encode() for n in range(d, 20, 4)]
    assert read(data_dir, "unknown") == []


@pytest.fixture
def ten(store: Store) -> list[int]:
    """dev-1 with messages m0..m9 received 1 us apart on varied topics; returns their times."""
    topics = ["temp", "hum", "status/a", "status/b/c"]
    items = [
        (BASE_NS + n * 1000, Record(f"devices/dev-1/{topics[n % 4]}", f"m{n}".encode()))
        for n in range(10)
    ]
    write(store, "dev-1", items)
    return [ns for ns, _ in items]


def payloads(msgs: Sequence[StoredMessage]) -> list[str]:
    """The payloads as text, for short asserts."""
    return [m.record.payload.decode() for m in msgs]


def test_window_since_inclusive_until_exclusive(ten: list[int], data_dir: Path) -> None:
    assert payloads(read(data_dir, "dev-1", since_ns=ten[2], until_ns=ten[5])) == ["m2", "m3", "m4"]
    assert payloads(read(data_dir, "dev-1", since_ns=ten[8])) == ["m8", "m9"]
    assert payloads(read(data_dir, "dev-1", until_ns=ten[2])) == ["m0", "m1"]
    assert payloads(read(data_dir, "dev-1", since_ns=ten[2] + 1, until_ns=ten[3] + 1)) == ["m3"]
    assert read(data_dir, "dev-1", since_ns=ten[4], until_ns=ten[4]) == []
    assert read(data_dir, "dev-1", since_ns=ten[9] + 1) == []


@pytest.mark.usefixtures("ten")
def test_topic_filter(data_dir: Path) -> None:
    assert payloads(read(data_dir, "dev-1", topic_filter="devices/dev-1/temp")) == [
        "m0",
        "m4",
        "m8",
    ]
    assert payloads(read(data_dir, "dev-1", topic_filter="devices/dev-1/+")) == [
        "m0",
        "m1",
        "m4",
        "m5",
        "m8",
        "m9",
    ]
    assert payloads(read(data_dir, "dev-1", topic_filter="devices/dev-1/status/#")) == [
        "m2",
        "m3",
        "m6",
        "m7",
    ]
    assert read(data_dir, "dev-1", topic_filter="devices/other/#") == []


def test_reverse(ten: list[int], data_dir: Path) -> None:
    assert payloads(read(data_dir, "dev-1", reverse=True)) == [f"m{n}" for n in range(9, -1, -1)]
    window = read(data_dir, "dev-1", since_ns=ten[3], until_ns=ten[6], reverse=True)
    assert payloads(window) == ["m5", "m4", "m3"]
    filtered = read(data_dir, "dev-1", topic_filter="devices/dev-1/temp", reverse=True)
    assert payloads(filtered) == ["m8", "m4", "m0"]


def test_reverse_stays_within_the_device(tmp_path: Path) -> None:
    # One partition, so every device's range has neighbours on both sides.
    store = Store.open(tmp_path / "one", 1)
    devices = [f"dev-{n}" for n in range(6)]
    try:
        for device in devices:
            write(store, device, [(BASE_NS + n, rec(n, device)) for n in range(3)])
    finally:
        store.close()
    for device in devices:
        got = read(tmp_path / "one", device, reverse=True)
        assert [m.record.topic for m in got] == [f"devices/{device}/t"] * 3, device
        assert payloads(got) == ["m2", "m1", "m0"]


# ---- the hybrid clock ---------------------------------------------------------------------------


def test_clock_step_back_keeps_keys_increasing(store: Store, data_dir: Path) -> None:
    received = [BASE_NS + 10, BASE_NS + 20, BASE_NS + 15, BASE_NS + 15, BASE_NS - 10**12]
    write(store, "dev-1", [(ns, rec(n)) for n, ns in enumerate(received)])
    got = read(data_dir, "dev-1")
    assert payloads(got) == ["m0", "m1", "m2", "m3", "m4"]
    assert [m.ts_ns for m in got] == [
        BASE_NS + 10,
        BASE_NS + 20,
        BASE_NS + 21,
        BASE_NS + 22,
        BASE_NS + 23,
    ]
    seqs = [m.seq for m in got]
    assert seqs == sorted(set(seqs))


def test_clock_is_per_partition_and_shared_by_its_devices(store: Store, data_dir: Path) -> None:
    # Two devices that land in the same partition share its clock.
    first = "dev-a"
    home = store.locate(first)[0]
    other = next(f"dev-{n}" for n in range(1000) if store.locate(f"dev-{n}")[0] == home)
    write(store, first, [(BASE_NS + 100, rec(0, first))])
    write(store, other, [(BASE_NS + 50, rec(1, other))])
    assert [m.ts_ns for m in read(data_dir, other)] == [BASE_NS + 101]


def test_clock_survives_reopen(data_dir: Path) -> None:
    store = Store.open(data_dir, 3)
    write(store, "dev-1", [(BASE_NS + n, rec(n)) for n in range(5)])
    clock = partition_of(store, "dev-1").clock_ns
    seq = partition_of(store, "dev-1").seq
    store.close()

    store = Store.open(data_dir)
    try:
        assert partition_of(store, "dev-1").clock_ns == clock == BASE_NS + 4
        assert partition_of(store, "dev-1").seq == seq
        # A clock far in the past after the restart still lands after the last key.
        write(store, "dev-1", [(BASE_NS - 3600 * 10**9, rec(5)), (1, rec(6))])
    finally:
        store.close()
    got = read(data_dir, "dev-1")
    assert payloads(got) == [f"m{n}" for n in range(7)]
    assert [m.ts_ns for m in got][-2:] == [BASE_NS + 5, BASE_NS + 6]
    keys = [(m.ts_ns, m.seq) for m in got]
    assert keys == sorted(set(keys))


# ---- the per-device index -----------------------------------------------------------------------


def expected_info(data_dir: Path, device: str) -> tuple[int, int, int, int, int]:
    """(first, last, count, bytes, dups) computed from the stored messages themselves."""
    msgs = read(data_dir, device)
    return (
        msgs[0].ts_ns,
        msgs[-1].ts_ns,
        len(msgs),
        sum(stored_size(m) for m in msgs),
        sum(m.record.dup for m in msgs),
    )


def test_index_matches_data_across_batches_and_reopen(data_dir: Path) -> None:
    devices = ["dev-a", "dev-b", "dev-c", "dev-d"]
    written = dict.fromkeys(devices, 0)
    dups = dict.fromkeys(devices, 0)
    clock = BASE_NS

    def batch(store: Store, sizes: dict[str, int]) -> None:
        nonlocal clock
        items: list[tuple[str, Pending]] = []
        for device, size in sizes.items():
            for n in range(size):
                clock += 1000
                dup = n % 3 == 2
                record = Record(f"devices/{device}/t", os.urandom(n * 7), dup=dup)
                items.append((store.locate(device)[0], pending(store, device, clock, record)))
                written[device] += 1
                dups[device] += dup
        by_partition: dict[str, list[Pending]] = {}
        for name, item in items:
            by_partition.setdefault(name, []).append(item)
        for name, group in by_partition.items():
            store.write(name, group)

    store = Store.open(data_dir, 3)
    batch(store, {"dev-a": 5, "dev-b": 3})
    batch(store, {"dev-a": 2, "dev-c": 4, "dev-d": 1})
    store.close()
    store = Store.open(data_dir)
    try:
        batch(store, {"dev-a": 3, "dev-b": 3, "dev-d": 6})
        placed = {d: store.locate(d)[0] for d in devices}
    finally:
        store.close()

    with StoreReader(data_dir) as reader:
        listed = reader.devices()
        single = reader.device("dev-c")
        assert reader.device("never-seen") is None
    assert [d.device for d in listed] == devices
    for info in listed:
        first, last, count, size, dup_count = expected_info(data_dir, info.device)
        assert (info.first_ns, info.last_ns, info.count, info.size, info.dups) == (
            first,
            last,
            count,
            size,
            dup_count,
        )
        assert info.count == written[info.device]
        assert info.dups == dups[info.device]
        assert info.partition == placed[info.device]
    assert single == next(d for d in listed if d.device == "dev-c")


# ---- the lock and readers beside the writer -----------------------------------------------------


@pytest.mark.usefixtures("store")
def test_second_writer_is_refused_naming_the_holder(data_dir: Path) -> None:
    with pytest.raises(DataDirLocked) as caught:
        Store.open(data_dir)
    assert caught.value.exit_code == EXIT_STORAGE
    assert f"held by pid {os.getpid()}" in caught.value.message()
    assert "Try:" in caught.value.message()


def test_close_releases_the_lock(data_dir: Path) -> None:
    Store.open(data_dir, 3).close()
    again = Store.open(data_dir)  # DataDirLocked if the closed store still held the lock
    try:
        with pytest.raises(DataDirLocked):
            Store.open(data_dir)  # and the new holder has it now
    finally:
        again.close()


def test_reader_beside_writer_sees_synced_writes(store: Store, data_dir: Path) -> None:
    write(store, "dev-1", [(BASE_NS + n, rec(n)) for n in range(5)])
    with StoreReader(data_dir) as reader:
        assert payloads(list(reader.messages("dev-1"))) == [f"m{n}" for n in range(5)]
        assert [d.count for d in reader.devices()] == [5]
        # A read-only handle sees what was synced when it opened, not later writes.
        write(store, "dev-1", [(BASE_NS + 10, rec(5))])
        assert len(list(reader.messages("dev-1"))) == 5
    assert len(read(data_dir, "dev-1")) == 6


# ---- bad data directories -----------------------------------------------------------------------


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(StorageError) as caught:
        Store.open(path)
    assert caught.value.exit_code == EXIT_STORAGE
    assert "not a directory" in caught.value.message()


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    parent = tmp_path / "file"
    parent.write_text("a regular file where a directory should be")
    with pytest.raises(StorageError) as caught:
        Store.open(parent / "data")
    assert caught.value.exit_code == EXIT_STORAGE
    assert "cannot create" in caught.value.message()


def test_data_dir_not_writable(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            # As root, permissions do not stop writes: nothing to check on this machine.
            return
        with pytest.raises(StorageError) as caught:
            Store.open(locked)
        assert caught.value.exit_code == EXIT_STORAGE
    finally:
        locked.chmod(0o700)


def write_manifest(data_dir: Path, text: str) -> None:
    """Replace the manifest of an existing store."""
    (data_dir / MANIFEST).write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"format": 1, "client_id": "x"}', "partitions"),
        ('{"format": 1, "partitions": [{"name": "p0", "path": "partitions/p0"}]}', "malformed"),
        ('{"client_id": "x", "partitions": []}', "format"),
        ("[]", "malformed"),
        ('{"format": 1, "client_id": "x", "partitions": []}', "no partitions"),
    ],
)
def test_corrupt_manifest_is_a_clear_error(data_dir: Path, text: str, expect: str) -> None:
    Store.open(data_dir, 3).close()
    good = (data_dir / MANIFEST).read_text(encoding="utf-8")
    write_manifest(data_dir, text)
    for opener in (Store.open, StoreReader):
        with pytest.raises(CorruptRecord) as caught:
            opener(data_dir)
        message = caught.value.message()
        assert caught.value.exit_code == EXIT_STORAGE
        assert expect in message
        assert MANIFEST in message
        assert "\n" not in message
    # The failed writer open let go of the lock.
    write_manifest(data_dir, good)
    Store.open(data_dir).close()


def test_manifest_of_a_newer_format(data_dir: Path) -> None:
    Store.open(data_dir, 3).close()
    raw = json.loads((data_dir / MANIFEST).read_text())
    raw["format"] = 99
    write_manifest(data_dir, json.dumps(raw))
    with pytest.raises(StorageError, match="format 99"):
        StoreReader(data_dir)


def test_reader_without_manifest(tmp_path: Path) -> None:
    for path in (tmp_path / "nothing-here", tmp_path):
        with pytest.raises(DataDirMissing) as caught:
            StoreReader(path)
        assert caught.value.exit_code == EXIT_STORAGE
        assert "Try:" in caught.value.message()
    assert not (tmp_path / "nothing-here").exists()


def test_reader_with_missing_partition(data_dir: Path) -> None:
    Store.open(data_dir, 3).close()
    spec = load_manifest(data_dir).partitions[1]
    (spec.directory(data_dir) / "CURRENT").unlink()
    with pytest.raises(StorageError, match="partition p1"):
        StoreReader(data_dir)


# ---- failure injection --------------------------------------------------------------------------


class _FailingDb:
    """An Rdict whose writes fail the way rocksdict reports a full disk; the rest passes through."""

    def __init__(self, db: Rdict) -> None:
        self._db = db

    def write(self, *_args: object) -> None:
        raise Exception(DISK_FULL)  # noqa: TRY002 - rocksdict raises a bare Exception

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def _snapshot(part: Partition) -> tuple[int, int, dict[bytes, bytes]]:
    entries = dict(part._entries.items())  # device key -> index entry as stored
    return part.clock_ns, part.seq, entries


def test_failed_write_changes_nothing_and_a_retry_stores_once(
    store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(store, "dev-1", [(BASE_NS + n, rec(n)) for n in range(3)])
    part = partition_of(store, "dev-1")
    before = _snapshot(part)
    assert before[2], "the index cache holds dev-1 after a write"

    monkeypatch.setattr(part, "_db", _FailingDb(part._db))
    retry = [(BASE_NS + 10 + n, rec(n)) for n in range(3, 6)]
    with pytest.raises(StorageUnavailable) as caught:
        write(store, "dev-1", retry)
    assert DISK_FULL in caught.value.message()
    assert caught.value.exit_code == EXIT_STORAGE
    assert _snapshot(part) == before

    monkeypatch.undo()
    write(store, "dev-1", retry)
    got = read(data_dir, "dev-1")
    assert payloads(got) == [f"m{n}" for n in range(6)]
    with StoreReader(data_dir) as reader:
        info = reader.device("dev-1")
    assert info is not None
    assert info.count == 6


class _FailingReads:
    """A column family whose reads fail with an I/O error, as rocksdict reports them."""

    def get(self, *_args: object) -> None:
        raise Exception("IO error: Input/output error")  # noqa: TRY002 - rocksdict raises it bare


def test_a_failed_index_read_is_a_storage_error(
    store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A device not in the index cache has its entry read while the batch is prepared; a failing
    # read must be the StorageError the pipeline holds and retries on, not a bare Exception.
    write(store, "dev-1", [(BASE_NS, rec(0))])
    part = partition_of(store, "dev-1")
    part._entries.clear()
    monkeypatch.setattr(part, "_index_cf", _FailingReads())
    with pytest.raises(StorageUnavailable, match=f"index of partition {part.name}"):
        write(store, "dev-1", [(BASE_NS + 1, rec(1))])
    monkeypatch.undo()
    write(store, "dev-1", [(BASE_NS + 1, rec(1))])
    assert payloads(read(data_dir, "dev-1")) == ["m0", "m1"]


def test_write_to_a_closed_partition(store: Store) -> None:
    partition, _ = store.locate("dev-1")
    store.close_partitions()
    with pytest.raises(StorageUnavailable, match=partition):
        write(store, "dev-1", [(BASE_NS, rec(0))])
    store.open_partitions()
    write(store, "dev-1", [(BASE_NS, rec(0))])


# ---- gap log and bridge state -------------------------------------------------------------------


def test_gap_log_record_all_overlapping(tmp_path: Path) -> None:
    log = GapLog(tmp_path)
    assert log.all() == []
    gaps = [
        Gap(100, 200, "session-lost"),
        Gap(300, 400, "downtime"),
        Gap(500, 501, "broker-dropped"),
    ]
    for gap in gaps:
        log.record(gap)
    assert GapLog(tmp_path).all() == gaps
    assert log.overlapping(None, None) == gaps
    assert log.overlapping(200, 300) == []  # gap ends are exclusive, like windows
    assert log.overlapping(199, 301) == gaps[:2]
    assert log.overlapping(None, 101) == gaps[:1]
    assert log.overlapping(400, None) == gaps[2:]
    assert log.overlapping(350, 360) == gaps[1:2]
    assert gaps[0].as_json() == {
        "since": "1970-01-01T00:00:00.000000100Z",
        "until": "1970-01-01T00:00:00.000000200Z",
        "reason": "session-lost",
    }


def test_gap_log_skips_a_torn_last_line(tmp_path: Path) -> None:
    log = GapLog(tmp_path)
    log.record(Gap(1, 2, "downtime"))
    with log.path.open("a") as out:
        out.write('{"since_ns": 3, "unt')
    assert log.all() == [Gap(1, 2, "downtime")]


def test_gap_log_recorded_after_a_torn_line_is_kept(tmp_path: Path) -> None:
    # A crash mid-append leaves a line without its newline; the next gaps must not be lost.
    log = GapLog(tmp_path)
    log.record(Gap(1, 2, "downtime"))
    with log.path.open("a") as out:
        out.write('{"since_ns": 3, "unt')
    log.record(Gap(5, 6, "session-lost"))
    log.record(Gap(7, 8, "broker-dropped"))
    assert log.all() == [
        Gap(1, 2, "downtime"),
        Gap(5, 6, "session-lost"),
        Gap(7, 8, "broker-dropped"),
    ]


def test_gap_log_corrupt_middle_line(tmp_path: Path) -> None:
    log = GapLog(tmp_path)
    log.record(Gap(1, 2, "downtime"))
    with log.path.open("a") as out:
        out.write("garbage\n")
    log.record(Gap(3, 4, "downtime"))
    with pytest.raises(CorruptRecord) as caught:
        log.all()
    assert "line 2" in caught.value.message()
    assert caught.value.exit_code == EXIT_STORAGE


def test_bridge_state_round_trip(tmp_path: Path) -> None:
    assert BridgeState.load(tmp_path) == BridgeState()
    state = BridgeState(BASE_NS, ["devices/+/#", "tele/+/+"])
    state.save(tmp_path)
    assert BridgeState.load(tmp_path) == state


@pytest.mark.parametrize(
    "content",
    ["", "{", "[]", '{"last_alive_ns": 1}', '{"last_alive_ns": "x", "subscriptions": []}'],
)
def test_unreadable_bridge_state_is_fresh(tmp_path: Path, content: str) -> None:
    (tmp_path / "state.json").write_text(content)
    assert BridgeState.load(tmp_path) == BridgeState()


def test_bridge_state_that_is_a_directory_is_fresh(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()
    assert BridgeState.load(tmp_path) == BridgeState()


# ---- the commit pipeline on a real store --------------------------------------------------------


class FaultyStore(Store):
    """A real store whose writes to some partitions fail like a full disk, until told otherwise."""

    def __init__(self, data_dir: Path, manifest: Manifest, lock: Any) -> None:
        super().__init__(data_dir, manifest, lock)
        self.failing: set[str] = set()
        self.writes = 0

    def write(
        self, partition: str, items: Sequence[Pending], prepared: object | None = None
    ) -> None:
        """Fail for partitions in `failing`; otherwise store."""
        if partition in self.failing:
            raise StorageUnavailable(f"write to partition {partition} failed: {DISK_FULL}")
        super().write(partition, items, prepared)
        self.writes += 1


@pytest.fixture
def faulty(data_dir: Path) -> Iterator[FaultyStore]:
    """A 3-partition FaultyStore, closed after the test."""
    opened = FaultyStore.open(data_dir, 3)
    assert isinstance(opened, FaultyStore)
    yield opened
    opened.close()


class Acks:
    """The pipeline's ack callback: records every call."""

    def __init__(self) -> None:
        self.calls: list[list[object]] = []

    def __call__(self, tokens: Sequence[object]) -> None:
        self.calls.append(list(tokens))

    @property
    def tokens(self) -> list[object]:
        """Every token acknowledged, in order."""
        return [t for call in self.calls for t in call]


def make_pipeline(store: Store, acks: Acks) -> CommitPipeline:
    """A pipeline for `devices/{device}/#` under the `backup` namespace."""
    router = Router([parse_template("devices/{device}/#")], "backup")
    return CommitPipeline(store, router, acks, batch_max=100, batch_ms=10)


def all_payloads(data_dir: Path) -> dict[str, list[str]]:
    """Every device's stored payloads as text."""
    with StoreReader(data_dir) as reader:
        return {d.device: payloads(list(reader.messages(d.device))) for d in reader.devices()}


def offer_ten(pipeline: CommitPipeline) -> dict[str, list[str]]:
    """m0..m9 over four devices, tokens t0..t9; returns what each device should hold."""
    want: dict[str, list[str]] = {}
    for n in range(10):
        device = f"dev-{n % 4}"
        pipeline.offer(Record(f"devices/{device}/t", f"m{n}".encode()), f"t{n}")
        want.setdefault(device, []).append(f"m{n}")
    return want


def test_pipeline_does_not_ack_a_failed_commit_and_stores_once_after(
    faulty: FaultyStore, data_dir: Path
) -> None:
    acks = Acks()
    pipeline = make_pipeline(faulty, acks)
    want = offer_ten(pipeline)
    faulty.failing = set(faulty.partitions)

    with pytest.raises(StorageUnavailable):
        pipeline.commit()
    assert acks.calls == []
    assert pipeline.pending == 10
    assert all_payloads(data_dir) == {}

    faulty.failing = set()
    assert pipeline.commit() == 10
    assert acks.calls == [[f"t{n}" for n in range(10)]]
    assert all_payloads(data_dir) == want
    assert pipeline.pending == 0
    assert not pipeline.has_work
    assert pipeline.commit() == 0
    assert len(acks.calls) == 1
    assert pipeline.counters.stored == 10


def test_pipeline_partial_failure_stores_each_message_once(
    faulty: FaultyStore, data_dir: Path
) -> None:
    acks = Acks()
    pipeline = make_pipeline(faulty, acks)
    want = offer_ten(pipeline)
    order = list(dict.fromkeys(faulty.locate(f"dev-{n % 4}")[0] for n in range(10)))
    assert len(order) >= 2, "the ten messages should span partitions"
    faulty.failing = {order[1]}

    with pytest.raises(StorageUnavailable):
        pipeline.commit()
    assert acks.calls == []
    stored_first = all_payloads(data_dir)
    assert stored_first, "the partition before the failing one was written"

    faulty.failing = set()
    pipeline.commit()
    assert acks.calls == [[f"t{n}" for n in range(10)]]
    assert all_payloads(data_dir) == want


def test_pipeline_skips_its_own_topics_and_replays_but_acks_them(
    store: Store, data_dir: Path
) -> None:
    acks = Acks()
    pipeline = make_pipeline(store, acks)
    pipeline.offer(Record("backup/restore/dev-1", b"{}"), "own")
    pipeline.offer(Record("devices/dev-1/a", b"replayed"), "replay", replayed=True)
    pipeline.offer(Record("devices/dev-1/b", b"qos0", qos=0), None)
    pipeline.offer(Record("elsewhere/x", b"unmatched"), "unmatched")
    pipeline.offer(Record("devices/dev-1/c", b"kept"), "kept")
    pipeline.offer(Record("backup/status/i", b"up"), None)
    assert pipeline.commit() == 2
    assert acks.tokens == ["own", "replay", "unmatched", "kept"]
    assert all_payloads(data_dir) == {"dev-1": ["qos0", "kept"]}
    assert pipeline.counters.skipped == 4


def test_pipeline_stores_qos0_without_acks(store: Store, data_dir: Path) -> None:
    acks = Acks()
    pipeline = make_pipeline(store, acks)
    for n in range(5):
        pipeline.offer(Record("devices/dev-9/t", f"m{n}".encode(), qos=0), None)
    assert pipeline.commit() == 5
    assert acks.tokens == []
    assert all_payloads(data_dir) == {"dev-9": [f"m{n}" for n in range(5)]}


def test_missing_partition_is_an_error_not_a_new_history(data_dir: Path) -> None:
    Store.open(data_dir, partitions=3).close()
    moved = data_dir / "partitions" / "p1"
    moved.rename(data_dir / "elsewhere")  # e.g. its disk is not mounted
    with pytest.raises(StorageError, match="partition p1 is missing") as caught:
        Store.open(data_dir)
    assert caught.value.exit_code == EXIT_STORAGE
    assert not moved.exists(), "nothing may be created in its place"
    (data_dir / "elsewhere").rename(moved)
    Store.open(data_dir).close()


def test_new_store_writes_its_manifest_last(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*_args: object, **_kwargs: object) -> None:
        raise StorageUnavailable("injected crash before the manifest")

    monkeypatch.setattr(Partition, "open_writer", crash)
    with pytest.raises(StorageUnavailable):
        Store.open(data_dir, partitions=2)
    assert not data_dir.exists(), "a failed first start removes what it created"
    monkeypatch.undo()
    Store.open(data_dir, partitions=2).close()
    assert len(load_manifest(data_dir).partitions) == 2


def test_a_secondary_reader_catches_up_with_the_partition_of_one_device(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    # A restore reads one device: refreshing only its partition saves the others' catch-up.
    devices = [f"dev-{n}" for n in range(20)]
    a = devices[0]
    b = next(d for d in devices if store.locate(d)[0] != store.locate(a)[0])
    with StoreReader(data_dir, secondary=tmp_path / "scratch") as reader:
        write(store, a, [(1, rec(1, a))])
        write(store, b, [(1, rec(1, b))])
        reader.refresh(a)
        assert payloads(list(reader.messages(a))) == ["m1"]
        assert list(reader.messages(b)) == [], "b's partition was not caught up"
        reader.refresh()
        assert payloads(list(reader.messages(b))) == ["m1"]
