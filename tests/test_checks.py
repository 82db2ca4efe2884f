"""verify and stats on a real RocksDB: clean stores, injected faults, a reader beside the writer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rocksdict import Options, Rdict

from mqtt_backup.errors import DataDirMissing
from mqtt_backup.keys import KEY_LEN, device_key, record_key
from mqtt_backup.placement import place
from mqtt_backup.records import Record, encode_record
from mqtt_backup.storage import Pending, Store
from mqtt_backup.storage.checks import PROGRESS_EVERY, Problem, VerifyReport, stats, verify
from mqtt_backup.storage.journal import Gap, GapLog
from mqtt_backup.storage.manifest import load_manifest
from mqtt_backup.storage.partition import IndexEntry
from mqtt_backup.times import format_ts

BASE_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
STEP_NS = 1000
PROBLEM_KEYS = {"partition", "device", "key", "problem"}
USAGE_KEYS = {
    "devices",
    "messages",
    "duplicates",
    "bytes",
    "disk_bytes",
    "oldest",
    "newest",
    "compression_ratio",
}


# ---- helpers ------------------------------------------------------------------------------------


@dataclass
class Written:
    """What a test stored: (receive time = stored time, record) per device, and placement."""

    messages: dict[str, list[tuple[int, Record]]] = field(default_factory=dict)
    partition: dict[str, str] = field(default_factory=dict)

    def records(self, devices: list[str] | None = None) -> list[tuple[int, Record]]:
        """Every (ts, record) of the devices (all by default)."""
        chosen = self.messages if devices is None else devices
        return [item for d in chosen for item in self.messages[d]]

    def held_by(self, partition: str) -> list[str]:
        """The devices placement gave to a partition."""
        return [d for d, p in self.partition.items() if p == partition]


def size_of(items: list[tuple[int, Record]]) -> int:
    """Stored bytes of records the way the index counts them: key plus encoded value."""
    return sum(KEY_LEN + len(encode_record(r, ts)) for ts, r in items)


def dups_of(items: list[tuple[int, Record]]) -> int:
    """How many of the records carry the DUP flag."""
    return sum(r.dup for _, r in items)


def fill(
    store: Store, devices: int, per_device: int, start_ns: int = BASE_NS, batch: int = 10
) -> Written:
    """Store messages of `devices` devices round-robin, as ingest would: grouped by partition.

    Receive times rise by STEP_NS from `start_ns`, so each stored time equals its receive time.
    Every 7th message of a device is a redelivered copy (DUP).
    """
    written = Written()
    ids = [f"dev-{n:03d}" for n in range(devices)]
    clock = start_ns
    for first in range(0, per_device, batch):
        groups: dict[str, list[Pending]] = {}
        for n in range(first, min(first + batch, per_device)):
            for device in ids:
                clock += STEP_NS
                name, dev_key = store.locate(device)
                record = Record(f"devices/{device}/t", f"{device}:{n};".encode() * (n % 5 + 1))
                if n % 7 == 3:
                    record = Record(record.topic, record.payload, dup=True)
                groups.setdefault(name, []).append(Pending(device, dev_key, clock, record))
                written.messages.setdefault(device, []).append((clock, record))
                written.partition[device] = name
        for name, items in groups.items():
            store.write(name, items)
    return written


def filled(data_dir: Path, devices: int = 30, per_device: int = 5) -> Written:
    """A closed 3-partition store holding a small fleet."""
    store = Store.open(data_dir, 3)
    try:
        return fill(store, devices, per_device)
    finally:
        store.close()


@contextmanager
def raw_partition(data_dir: Path, name: str) -> Iterator[tuple[Rdict, Rdict]]:
    """(records family, index family) of a closed partition, opened directly: fault injection."""
    spec = next(s for s in load_manifest(data_dir).partitions if s.name == name)
    raw = Options(raw_mode=True)
    db = Rdict(
        str(spec.directory(data_dir)),
        Options(raw_mode=True),
        column_families={"index": raw, "meta": Options(raw_mode=True)},
    )
    try:
        yield db, db.get_column_family("index")
    finally:
        db.close()


def device_records(db: Rdict, device: str) -> list[tuple[bytes, bytes]]:
    """A device's (key, value) pairs in key order, read directly."""
    dev_key = device_key(device)
    found = []
    for key, value in db.items():
        assert isinstance(key, bytes)
        assert isinstance(value, bytes)
        if key.startswith(dev_key):
            found.append((key, value))
    return found


def one_problem(report: VerifyReport) -> Problem:
    """The only problem of a report that must have exactly one."""
    assert len(report.problems) == 1, [p.describe() for p in report.problems]
    assert not report.ok
    assert report.as_json()["ok"] is False
    return report.problems[0]


# ---- verify: clean stores -----------------------------------------------------------------------


def test_clean_store_verifies_with_totals(data_dir: Path) -> None:
    written = filled(data_dir, devices=50, per_device=40)
    counts: list[int] = []

    report = verify(data_dir, counts.append)

    assert report.ok, [p.describe() for p in report.problems]
    assert report.partitions == 3
    assert report.devices == 50
    assert report.records == 2000
    assert report.duplicates == dups_of(written.records()) == 50 * 6
    assert report.size == size_of(written.records())
    assert counts == [PROGRESS_EVERY, 2 * PROGRESS_EVERY]
    assert report.as_json() == {
        "ok": True,
        "partitions": 3,
        "devices": 50,
        "records": 2000,
        "duplicates": 300,
        "bytes": report.size,
        "problems": [],
    }


def test_progress_ends_with_the_final_count(data_dir: Path) -> None:
    filled(data_dir, devices=7, per_device=3)
    counts: list[int] = []
    assert verify(data_dir, counts.append).records == 21
    assert counts == [21]


def test_empty_store_verifies(data_dir: Path) -> None:
    Store.open(data_dir, 3).close()
    report = verify(data_dir)
    assert report.ok
    assert (report.partitions, report.devices, report.records, report.size) == (3, 0, 0, 0)


def test_verify_beside_a_running_writer(data_dir: Path) -> None:
    store = Store.open(data_dir, 3)
    try:
        fill(store, 10, 5)
        first = verify(data_dir)
        fill(store, 12, 5, start_ns=BASE_NS + 10**9)
        second = verify(data_dir)
    finally:
        store.close()
    assert first.ok, [p.describe() for p in first.problems]
    assert (first.devices, first.records) == (10, 50)
    assert second.ok, [p.describe() for p in second.problems]
    assert (second.devices, second.records) == (12, 110)


def test_no_data_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(DataDirMissing):
        verify(tmp_path / "nothing")


def test_missing_partition_is_a_problem_and_the_rest_is_checked(data_dir: Path) -> None:
    written = filled(data_dir)
    spec = load_manifest(data_dir).partitions[1]
    (spec.directory(data_dir) / "CURRENT").unlink()

    report = verify(data_dir)

    problem = one_problem(report)
    assert (problem.partition, problem.device, problem.key) == ("p1", None, None)
    assert "missing" in problem.what
    others = [d for d, p in written.partition.items() if p != "p1"]
    assert report.devices == len(others)
    assert report.records == len(written.records(others))


# ---- verify: damaged records --------------------------------------------------------------------


def test_flipped_byte_in_a_value_is_a_checksum_problem(data_dir: Path) -> None:
    written = filled(data_dir)
    device = "dev-004"
    partition = written.partition[device]
    with raw_partition(data_dir, partition) as (db, _):
        key, value = device_records(db, device)[2]
        damaged = bytearray(value)
        damaged[-1] ^= 0x01
        db[key] = bytes(damaged)

    report = verify(data_dir)

    assert one_problem(report) == Problem(
        partition, device, key.hex(), "corrupt record: checksum mismatch"
    )
    assert report.records == len(written.records())
    assert report.as_json()["problems"] == [
        {
            "partition": partition,
            "device": device,
            "key": key.hex(),
            "problem": "corrupt record: checksum mismatch",
        }
    ]


def test_record_time_differing_from_key_and_short_key(data_dir: Path) -> None:
    written = filled(data_dir)
    device = "dev-007"
    partition = written.partition[device]
    ts, record = written.messages[device][1]
    with raw_partition(data_dir, partition) as (db, _):
        key, _ = device_records(db, device)[1]
        db[key] = encode_record(record, ts + 1)  # a valid checksum over the wrong time
        short = device_key(device) + b"\x00" * 4
        db[short] = encode_record(record, ts)

    report = verify(data_dir)

    assert not report.ok
    assert [(p.partition, p.device, p.key) for p in report.problems] == [
        (partition, None, short.hex()),
        (partition, device, key.hex()),
    ]
    assert report.problems[0].what == f"key is 20 bytes, not {KEY_LEN}"
    assert report.problems[1].what == (
        f"record time {format_ts(ts + 1)} differs from its key's {format_ts(ts)}"
    )
    assert report.records == len(written.records()) + 1


def test_corrupt_block_on_disk_is_not_ok(data_dir: Path) -> None:
    written = filled(data_dir, devices=50, per_device=40)
    with raw_partition(data_dir, "p0") as (db, _):
        db.flush()
    spec = load_manifest(data_dir).partitions[0]
    table = max(spec.directory(data_dir).glob("*.sst"), key=lambda f: f.stat().st_size)
    data = bytearray(table.read_bytes())
    data[len(data) // 3] ^= 0xFF
    table.write_bytes(bytes(data))

    report = verify(data_dir)

    assert not report.ok
    assert {p.partition for p in report.problems} == {"p0"}
    assert report.records < len(written.records())


# ---- verify: placement and the index ------------------------------------------------------------


def test_device_in_the_wrong_partition_is_misplaced(data_dir: Path) -> None:
    filled(data_dir)
    device = "stray"
    dev_key = device_key(device)
    home = place(dev_key, load_manifest(data_dir).weighted)
    elsewhere = next(p for p in ("p0", "p1", "p2") if p != home)
    ts = BASE_NS - 10**9  # before the partition's clock, as a moved device's history would be
    key = record_key(dev_key, ts, 1)
    value = encode_record(Record("devices/stray/t", b"lost"), ts)
    with raw_partition(data_dir, elsewhere) as (db, index):
        db[key] = value
        index[dev_key] = IndexEntry(device, ts, ts, 1, len(key) + len(value), 0).encode()

    problem = one_problem(verify(data_dir))

    assert (problem.partition, problem.device, problem.key) == (elsewhere, device, dev_key.hex())
    assert problem.what == f"misplaced: placement puts it in {home}"


def test_wrong_index_count(data_dir: Path) -> None:
    written = filled(data_dir)
    device = "dev-011"
    partition = written.partition[device]
    dev_key = device_key(device)
    with raw_partition(data_dir, partition) as (_, index):
        raw = index[dev_key]
        assert isinstance(raw, bytes)
        entry = IndexEntry.decode(raw)
        entry.count += 1
        index[dev_key] = entry.encode()

    problem = one_problem(verify(data_dir))

    assert (problem.partition, problem.device, problem.key) == (partition, device, dev_key.hex())
    assert problem.what == "index count 6, records 5"


def test_index_entry_without_records(data_dir: Path) -> None:
    filled(data_dir)
    dev_key = device_key("ghost")
    home = place(dev_key, load_manifest(data_dir).weighted)
    with raw_partition(data_dir, home) as (_, index):
        index[dev_key] = IndexEntry("ghost", BASE_NS, BASE_NS, 3, 300, 0).encode()

    problem = one_problem(verify(data_dir))

    assert (problem.partition, problem.device, problem.key) == (home, "ghost", dev_key.hex())
    assert problem.what == "index entry without records (index count 3)"


def test_records_without_index_entry(data_dir: Path) -> None:
    written = filled(data_dir)
    device = "dev-020"
    partition = written.partition[device]
    dev_key = device_key(device)
    with raw_partition(data_dir, partition) as (_, index):
        del index[dev_key]

    report = verify(data_dir)

    assert one_problem(report) == Problem(
        partition, None, dev_key.hex(), "5 records without an index entry"
    )
    assert report.devices == 30


def test_unparsable_index_entry_does_not_stop_the_check(data_dir: Path) -> None:
    written = filled(data_dir)
    partition = "p2"
    held = sorted(written.held_by(partition), key=device_key)
    broken = held[len(held) // 2]
    dev_key = device_key(broken)
    with raw_partition(data_dir, partition) as (_, index):
        index[dev_key] = b"\x07" + bytes(40) + b"garbage"

    report = verify(data_dir)

    assert not report.ok
    assert report.devices == 30
    assert {p.partition for p in report.problems} == {partition}
    assert report.problems[0].what.startswith("index unreadable after device key")
    # The devices after the broken entry are still checked against the index, one by one.
    assert {p.key for p in report.problems[1:]} == {dev_key.hex()}
    assert [p.what for p in report.problems[1:]] == [
        "corrupt record: unknown index entry version 7",
        "5 records without an index entry",
    ]


# ---- stats --------------------------------------------------------------------------------------


def test_stats_match_what_was_written(data_dir: Path) -> None:
    written = filled(data_dir, devices=20, per_device=10)
    gaps = GapLog(data_dir)
    gaps.record(Gap(BASE_NS - 10**9, BASE_NS, "downtime"))
    gaps.record(Gap(BASE_NS + 10**9, BASE_NS + 2 * 10**9, "session-lost"))

    report = stats(data_dir)

    assert [p.name for p in report.partitions] == ["p0", "p1", "p2"]
    for part in report.partitions:
        devices = written.held_by(part.name)
        items = written.records(devices)
        usage = part.usage
        assert devices, "every partition holds some of 20 devices"
        assert part.path == data_dir / "partitions" / part.name
        assert part.weight == 1.0
        assert usage.devices == len(devices)
        assert usage.messages == len(items)
        assert usage.duplicates == dups_of(items)
        assert usage.size == size_of(items)
        assert usage.oldest_ns == min(ts for ts, _ in items)
        assert usage.newest_ns == max(ts for ts, _ in items)
        assert usage.disk_bytes > 0
        ratio = usage.compression_ratio
        assert isinstance(ratio, float)
        assert ratio > 0
    total = report.total
    assert total.devices == 20
    assert total.messages == 200
    assert total.duplicates == dups_of(written.records())
    assert total.size == size_of(written.records())
    assert total.disk_bytes == sum(p.usage.disk_bytes for p in report.partitions)
    assert total.oldest_ns == BASE_NS + STEP_NS
    assert total.newest_ns == BASE_NS + 200 * STEP_NS
    assert report.gaps == 2


def test_stats_json_shape(data_dir: Path) -> None:
    written = filled(data_dir, devices=1, per_device=4)
    home = written.partition["dev-000"]

    doc = stats(data_dir).as_json()

    assert set(doc) == {"partitions", "total", "gaps"}
    assert doc["gaps"] == 0
    assert set(doc["total"]) == USAGE_KEYS
    for part in doc["partitions"]:
        assert set(part) == USAGE_KEYS | {"name", "path", "weight"}
        assert part["path"] == str(data_dir / "partitions" / part["name"])
        if part["name"] == home:
            assert part["messages"] == 4
            assert (
                part["oldest"] == format_ts(BASE_NS + STEP_NS) == "2026-01-01T00:00:00.000001000Z"
            )
            assert part["newest"] == format_ts(BASE_NS + 4 * STEP_NS)
            assert isinstance(part["compression_ratio"], float)
        else:
            assert part["devices"] == part["messages"] == part["bytes"] == 0
            assert part["oldest"] is None
            assert part["newest"] is None
            assert part["compression_ratio"] is None
            assert part["disk_bytes"] > 0
    total = doc["total"]
    assert (total["devices"], total["messages"], total["duplicates"]) == (1, 4, 1)
    assert total["oldest"] == format_ts(BASE_NS + STEP_NS)
    assert total["newest"] == format_ts(BASE_NS + 4 * STEP_NS)


def test_stats_of_an_empty_store(data_dir: Path) -> None:
    Store.open(data_dir, 3).close()
    report = stats(data_dir)
    assert report.total.messages == 0
    assert report.total.oldest_ns is None
    assert report.total.newest_ns is None
    assert report.total.compression_ratio is None
    assert report.as_json()["total"]["oldest"] is None
