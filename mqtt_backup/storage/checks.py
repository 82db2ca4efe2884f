"""Read-only checks of a data directory: `verify` (a full scan) and `stats` (the index only).

Both open the partitions read-only, so they run beside a bridge that is writing and see what it had
synced when they opened. What verify finds is data in its report, not an exception: only a data
directory that cannot be read at all (no manifest) raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqtt_backup.errors import CorruptRecord, StorageError
from mqtt_backup.keys import DEVICE_KEY_LEN, KEY_LEN, device_key, split_key
from mqtt_backup.placement import Weighted, place
from mqtt_backup.records import decode_record
from mqtt_backup.storage.manifest import load_manifest
from mqtt_backup.storage.partition import IndexEntry, Partition
from mqtt_backup.storage.store import StoreReader
from mqtt_backup.times import format_ts

PROGRESS_EVERY = 1000

__all__ = [
    "PROGRESS_EVERY",
    "PartitionStats",
    "Problem",
    "StatsReport",
    "Usage",
    "VerifyReport",
    "stats",
    "verify",
]


# ---- verify -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing verify found wrong: where (partition, device id, key in hex) and what."""

    partition: str
    device: str | None
    key: str | None
    what: str

    def as_json(self) -> dict[str, str | None]:
        """The problem as `verify --json` lists it."""
        return {
            "partition": self.partition,
            "device": self.device,
            "key": self.key,
            "problem": self.what,
        }

    def describe(self) -> str:
        """One line for people: where, then what."""
        where = [self.partition]
        if self.device is not None:
            where.append(f"device {self.device}")
        if self.key is not None:
            where.append(f"key {self.key}")
        return f"{' '.join(where)}: {self.what}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What a full scan found: the problems and what was scanned.

    `records` and `size` count every entry of the records family (well-formed or not); `devices`
    the distinct device keys that have records; `duplicates` the readable records that carry the
    DUP (redelivered) flag.
    """

    problems: list[Problem]
    partitions: int
    devices: int
    records: int
    duplicates: int
    size: int

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        """The report as `verify --json` prints it."""
        return {
            "ok": self.ok,
            "partitions": self.partitions,
            "devices": self.devices,
            "records": self.records,
            "duplicates": self.duplicates,
            "bytes": self.size,
            "problems": [p.as_json() for p in self.problems],
        }


def verify(data_dir: Path, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Scan every partition in full: checksums, key/value times, placement, index against data.

    `progress` gets the running record count every PROGRESS_EVERY records and once at the end.
    Partitions are opened one at a time, so one that cannot be opened is a problem of the report
    and the others are still checked. Raises StorageError only when there is no readable manifest.
    """
    manifest = load_manifest(data_dir)
    checker = _Verifier(manifest.weighted, progress or _no_progress)
    for spec in manifest.partitions:
        try:
            part = Partition.open_reader(spec.name, spec.directory(data_dir))
        except StorageError as exc:
            checker.problem(spec.name, None, None, exc.message())
            continue
        try:
            checker.check(part)
        finally:
            part.close()
    return checker.report(len(manifest.partitions))


def _no_progress(_count: int) -> None:
    """Progress sink for callers that show none."""


@dataclass(slots=True)
class _Device:
    """What one device's records in one partition add up to."""

    key: bytes
    entry: IndexEntry | None
    first_ns: int
    last_ns: int = 0
    count: int = 0
    size: int = 0
    dups: int = 0
    unreadable: int = 0  # records that do not decode: their DUP flag is unknown

    @property
    def name(self) -> str | None:
        """The device id, when the index knows it."""
        return self.entry.device_id if self.entry is not None else None


class _IndexCursor:
    """Walks a partition's index in device-key order, in step with the records scan.

    Both are sorted by device key, so a merge needs no memory per device. If an entry does not
    parse, the walk cannot go on (index_entries() is a generator): devices with records are then
    looked up one by one, and index entries past that point without records go unseen.
    """

    def __init__(self, part: Partition, problems: list[Problem]) -> None:
        self._part = part
        self._problems = problems
        self._entries = part.index_entries()
        self._last = b""
        self._broken = False
        self._next: tuple[bytes, IndexEntry] | None = None
        self._advance()

    def _advance(self) -> None:
        try:
            self._next = next(self._entries, None)
        except CorruptRecord as exc:
            self._next, self._broken = None, True
            after = f" after device key {self._last.hex()}" if self._last else ""
            self._problems.append(
                Problem(self._part.name, None, None, f"index unreadable{after}: {exc.detail}")
            )
            return
        if self._next is not None:
            self._last = self._next[0]

    def take(self, dev_key: bytes) -> tuple[IndexEntry | None, list[tuple[bytes, IndexEntry]]]:
        """(this device's entry, entries before it, which have no records)."""
        passed = []
        while self._next is not None and self._next[0] < dev_key:
            passed.append(self._next)
            self._advance()
        if self._next is not None and self._next[0] == dev_key:
            entry = self._next[1]
            self._advance()
            return entry, passed
        return (self._lookup(dev_key) if self._broken else None), passed

    def _lookup(self, dev_key: bytes) -> IndexEntry | None:
        try:
            return self._part.index_entry(dev_key)
        except CorruptRecord as exc:
            self._problems.append(Problem(self._part.name, None, dev_key.hex(), exc.message()))
            return None

    def rest(self) -> Iterator[tuple[bytes, IndexEntry]]:
        """The entries after the last device with records."""
        while self._next is not None:
            yield self._next
            self._advance()


@dataclass(slots=True)
class _Verifier:
    """Accumulates problems and totals over the partitions of one verify run."""

    weighted: list[Weighted]
    progress: Callable[[int], None]
    problems: list[Problem] = field(default_factory=list)
    devices: int = 0
    records: int = 0
    duplicates: int = 0
    size: int = 0
    _reported: int = 0

    def problem(self, partition: str, device: str | None, key: str | None, what: str) -> None:
        """Note one problem."""
        self.problems.append(Problem(partition, device, key, what))

    def report(self, partitions: int) -> VerifyReport:
        """The finished report (and the last progress call)."""
        if self._reported != self.records:
            self.progress(self.records)
        return VerifyReport(
            list(self.problems), partitions, self.devices, self.records, self.duplicates, self.size
        )

    def check(self, part: Partition) -> None:
        """Scan one partition and hold its records against its index."""
        index = _IndexCursor(part, self.problems)
        current: _Device | None = None
        newest = 0
        for key, value in self._scan(part):
            if len(key) != KEY_LEN:
                self.problem(part.name, None, key.hex(), f"key is {len(key)} bytes, not {KEY_LEN}")
                continue
            dev_key, ts_ns, _ = split_key(key)
            if current is None or current.key != dev_key:
                if current is not None:
                    self._device_done(part.name, current)
                current = self._device_start(part.name, dev_key, ts_ns, index)
            self._record(part.name, current, key, ts_ns, value)
            newest = max(newest, ts_ns)
        if current is not None:
            self._device_done(part.name, current)
        for dev_key, entry in index.rest():
            self._index_only(part.name, dev_key, entry)
        if newest > part.clock_ns:
            # The next write would take keys at or below stored ones.
            self.problem(
                part.name,
                None,
                None,
                f"clock high-water mark {format_ts(part.clock_ns)} is behind the newest record "
                f"{format_ts(newest)}",
            )

    def _scan(self, part: Partition) -> Iterator[tuple[bytes, bytes]]:
        records = part.records()
        while True:
            try:
                key, value = next(records)
            except StopIteration:
                return
            except StorageError as exc:
                self.problem(part.name, None, None, f"scan stopped: {exc.message()}")
                return
            self.records += 1
            self.size += len(key) + len(value)
            if self.records % PROGRESS_EVERY == 0:
                self.progress(self.records)
                self._reported = self.records
            yield key, value

    def _record(
        self, partition: str, device: _Device, key: bytes, ts_ns: int, value: bytes
    ) -> None:
        device.last_ns = ts_ns
        device.count += 1
        device.size += len(key) + len(value)
        try:
            value_ts, record = decode_record(value)
        except CorruptRecord as exc:
            device.unreadable += 1
            self.problem(partition, device.name, key.hex(), exc.message())
            return
        if record.dup:
            device.dups += 1
            self.duplicates += 1
        if value_ts != ts_ns:
            self.problem(
                partition,
                device.name,
                key.hex(),
                f"record time {format_ts(value_ts)} differs from its key's {format_ts(ts_ns)}",
            )

    def _device_start(
        self, partition: str, dev_key: bytes, ts_ns: int, index: _IndexCursor
    ) -> _Device:
        self.devices += 1
        entry, passed = index.take(dev_key)
        for orphan_key, orphan in passed:
            self._index_only(partition, orphan_key, orphan)
        device = _Device(dev_key, entry, ts_ns)
        home = place(dev_key, self.weighted)
        if home != partition:
            self.problem(
                partition, device.name, dev_key.hex(), f"misplaced: placement puts it in {home}"
            )
        return device

    def _device_done(self, partition: str, device: _Device) -> None:
        if device.entry is None:
            what = f"{device.count} records without an index entry"
            self.problem(partition, None, device.key.hex(), what)
            return
        for what in _index_mismatches(device, device.entry):
            self.problem(partition, device.name, device.key.hex(), what)

    def _index_only(self, partition: str, dev_key: bytes, entry: IndexEntry) -> None:
        if len(dev_key) != DEVICE_KEY_LEN:
            what = f"index key is {len(dev_key)} bytes, not {DEVICE_KEY_LEN}"
        else:
            what = f"index entry without records (index count {entry.count})"
        self.problem(partition, entry.device_id, dev_key.hex(), what)


def _index_mismatches(device: _Device, entry: IndexEntry) -> list[str]:
    """How the index entry differs from what the device's records add up to."""
    found = []
    if device_key(entry.device_id) != device.key:
        found.append(f"index entry names device {entry.device_id!r}, whose key is another")
    pairs = (("count", entry.count, device.count), ("bytes", entry.size, device.size))
    found.extend(
        f"index {what} {have}, records {want}" for what, have, want in pairs if have != want
    )
    times = (("first", entry.first_ns, device.first_ns), ("last", entry.last_ns, device.last_ns))
    found.extend(
        f"index {what} {format_ts(have)}, records {format_ts(want)}"
        for what, have, want in times
        if have != want
    )
    # An unreadable record may or may not have been a duplicate.
    if not device.dups <= entry.dups <= device.dups + device.unreadable:
        found.append(f"index duplicates {entry.dups}, records {device.dups}")
    return found


# ---- stats --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """What a partition (or the whole store) holds, from the index; `size` is stored bytes."""

    devices: int = 0
    messages: int = 0
    duplicates: int = 0
    size: int = 0
    disk_bytes: int = 0
    oldest_ns: int | None = None
    newest_ns: int | None = None

    @property
    def compression_ratio(self) -> float | None:
        """Stored bytes per byte on disk; None when nothing is stored or nothing is on disk."""
        if self.size == 0 or self.disk_bytes == 0:
            return None
        return self.size / self.disk_bytes

    def __add__(self, other: Usage) -> Usage:
        """Both together (totals over partitions)."""
        return Usage(
            self.devices + other.devices,
            self.messages + other.messages,
            self.duplicates + other.duplicates,
            self.size + other.size,
            self.disk_bytes + other.disk_bytes,
            _pick(min, self.oldest_ns, other.oldest_ns),
            _pick(max, self.newest_ns, other.newest_ns),
        )

    def as_json(self) -> dict[str, Any]:
        """The numbers as `stats --json` prints them (RFC 3339 times, null when empty)."""
        ratio = self.compression_ratio
        return {
            "devices": self.devices,
            "messages": self.messages,
            "duplicates": self.duplicates,
            "bytes": self.size,
            "disk_bytes": self.disk_bytes,
            "oldest": format_ts(self.oldest_ns) if self.oldest_ns is not None else None,
            "newest": format_ts(self.newest_ns) if self.newest_ns is not None else None,
            "compression_ratio": round(ratio, 3) if ratio is not None else None,
        }


def _pick(choose: Callable[[int, int], int], a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return choose(a, b)


@dataclass(frozen=True, slots=True)
class PartitionStats:
    """One partition as `stats` shows it."""

    name: str
    path: Path
    weight: float
    usage: Usage

    def as_json(self) -> dict[str, Any]:
        """Name, path and weight, then the usage numbers."""
        return {
            "name": self.name,
            "path": str(self.path),
            "weight": self.weight,
            **self.usage.as_json(),
        }


@dataclass(frozen=True, slots=True)
class StatsReport:
    """Every partition, the total over them, and how many gaps the gap log records.

    The total's `devices` is the sum over partitions: a device held by two (a partition move
    cut short) counts twice, which verify reports as misplaced.
    """

    partitions: list[PartitionStats]
    total: Usage
    gaps: int

    def as_json(self) -> dict[str, Any]:
        """The report as `stats --json` prints it."""
        return {
            "partitions": [p.as_json() for p in self.partitions],
            "total": self.total.as_json(),
            "gaps": self.gaps,
        }


def stats(data_dir: Path) -> StatsReport:
    """Per-partition and total numbers from the index (no scan of the records)."""
    with StoreReader(data_dir) as reader:
        found = [
            PartitionStats(
                spec.name,
                spec.directory(data_dir),
                spec.weight,
                _usage(reader.partitions[spec.name]),
            )
            for spec in reader.manifest.partitions
        ]
        gaps = len(reader.gaps.all())
    total = sum((p.usage for p in found), Usage())
    return StatsReport(found, total, gaps)


def _usage(part: Partition) -> Usage:
    devices = messages = duplicates = size = 0
    oldest: int | None = None
    newest: int | None = None
    for _, entry in part.index_entries():
        if entry.count == 0:
            continue
        devices += 1
        messages += entry.count
        duplicates += entry.dups
        size += entry.size
        oldest = _pick(min, oldest, entry.first_ns)
        newest = _pick(max, newest, entry.last_ns)
    return Usage(devices, messages, duplicates, size, part.disk_bytes(), oldest, newest)
