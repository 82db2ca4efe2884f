"""One partition = one RocksDB database with three column families.

- default: the records, `device_key | ts_ns | seq` -> encoded record
- `index`: one entry per device (first/last receive time, count, stored bytes, redelivered copies)
- `meta`:  format version, the hybrid clock's high-water mark, the sequence counter

Records, index entries and meta of one commit go in one WriteBatch written with a synced WAL, so
after a crash the three always agree.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import struct
import tempfile
import zlib
from bisect import bisect_left
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, islice
from operator import itemgetter
from pathlib import Path
from typing import Any, cast

from rocksdict import (
    AccessType,
    BlockBasedOptions,
    Cache,
    Checkpoint,
    DBCompressionType,
    Options,
    Rdict,
    RdictIter,
    ReadOptions,
    WriteBatch,
    WriteBufferManager,
    WriteOptions,
)

from mqtt_backup.errors import CorruptRecord, DataDirLocked, StorageError, StorageUnavailable
from mqtt_backup.keys import KEY_LEN, SEQ_MASK, device_range, key_tail, split_key
from mqtt_backup.records import (
    FORMAT_VERSION,
    Record,
    decode_record,
    encode_parts,
    is_dup,
    stored_parts,
)
from mqtt_backup.storage import ballast
from mqtt_backup.storage.cache import FifoCache

log = logging.getLogger(__name__)
_KEY_OF = itemgetter(0)
_VALUE_OF = itemgetter(1)
# Records taken from the item iterator at a time when a chunk has a byte budget: the budget is
# checked between takes, and what a take read past it is dropped at once.
_TAKE = 32


def _take(
    items: Iterator[tuple[bytes, bytes]], limit: int, max_bytes: int | None
) -> tuple[list[tuple[bytes, bytes]], bool, int]:
    """(rows, whether `items` ran out, their values' bytes): as `read_range`'s loop would stop.

    Up to `limit` rows; with `max_bytes`, up to and including the row whose value reaches it.
    A take is never more rows than the budget left holds at the largest value seen so far
    (the first, one row), so big values are read a few at a time.
    """
    if max_bytes is None:
        found = list(islice(items, limit))
        return found, len(found) < limit, 0
    found = []
    spent = biggest = 0
    while len(found) < limit:
        room = max_bytes - spent
        want = min(limit - len(found), _TAKE, max(1, room // biggest) if biggest else 1)
        took = list(islice(items, want))
        sizes = list(map(len, map(_VALUE_OF, took)))
        totals = list(accumulate(sizes))
        if totals and totals[-1] >= room:  # the budget is reached in this take: stop there
            end = bisect_left(totals, room) + 1
            found += took[:end]
            return found, False, spent + totals[end - 1]
        found += took
        spent += totals[-1] if totals else 0
        if len(took) < want:
            return found, True, spent
        biggest = max(biggest, *sizes)
    return found, False, spent


CF_INDEX = "index"
CF_META = "meta"
META_FORMAT = b"format"
META_CLOCK = b"clock"
META_SEQ = b"seq"

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_INDEX = struct.Struct(">BQQQQQ")  # version, first_ns, last_ns, count, bytes, dups; then the id
_INDEX_VERSION = 1
_INDEX_PACK = _INDEX.pack
_INDEX_UNPACK = _INDEX.unpack_from
_Stats = list[int]  # an index entry's first_ns, last_ns, count, size, dups, as `prepare` adds up
_STAMP_PACK = struct.Struct(">BQ").pack  # flags, receive time: records.encode_parts' first part
_HEAD_PACK = struct.Struct(">BI").pack  # format version, crc32: what precedes a record's body
_crc32 = zlib.crc32
# Index entries kept in memory for the write path, as stored (the packed entry: ~90 B for an id of
# a dozen characters, ~150 B with its dict slot and key), per store: each of its partitions keeps
# its share. The rest are read back from the index column family when their device writes again
# (memory stays flat whatever the fleet size). 131,072: a fleet of 100k devices stays cached (as
# lists of five ints, ~300 B each, 16,384 of them missed on every message of such a fleet).
INDEX_CACHE_ENTRIES = 131072


def index_cache_share(partitions: int) -> int:
    """Index entries each of a store's `partitions` keeps in memory: its share of the budget."""
    return max(2, INDEX_CACHE_ENTRIES // max(1, partitions))


# A move's copy reads and writes at most this many bytes of values at once (one record at least):
# its unit counts records, and 10,000 large payloads would otherwise be held twice in memory.
COPY_BYTES = 8 * 1024 * 1024


class Pending(tuple[str, bytes, int, int, bytes, bytes]):
    """A message received and not yet stored: where it goes and its record, in stored form.

    (device id, device key, receive time, then the record as `records.stored_parts` gives it:
    flags, the middle bytes, the payload.) One tuple per message and no `Record`: the ingest path
    makes millions, and `prepare` only joins the parts with the time. `Pending(device, key, ns,
    record)` makes one from a record; the ingest pipeline builds the tuple directly.
    """

    __slots__ = ()

    def __new__(
        cls, device_id: str, device_key: bytes, received_ns: int, record: Record
    ) -> Pending:
        """The pending form of `record` received at `received_ns`."""
        flags, middle = stored_parts(record)
        parts = (device_id, device_key, received_ns, flags, middle, record.payload)
        return tuple.__new__(cls, parts)

    @property
    def device_id(self) -> str:
        """The device the message belongs to."""
        return self[0]

    @property
    def device_key(self) -> bytes:
        """Its device key."""
        return self[1]

    @property
    def received_ns(self) -> int:
        """When the bridge received it."""
        return self[2]

    @property
    def payload(self) -> bytes:
        """The payload as received."""
        return self[5]

    @property
    def dup(self) -> bool:
        """Whether the broker marked it redelivered."""
        return is_dup(self[3])

    @property
    def record(self) -> Record:
        """The record (decoded again from its parts: not for a per-message path)."""
        flags, middle, payload = self[3], self[4], self[5]
        return decode_record(encode_parts(flags, self[2], middle, payload))[1]


@dataclass(slots=True)
class Prepared:
    """A write made ready by `Partition.prepare`, for `Partition.apply` of the same partition."""

    partition: Partition
    batch: WriteBatch
    clock_ns: int  # the partition's clock and sequence once it is applied
    seq: int
    touched: dict[bytes, bytes]  # device key -> its index entry (stored bytes) once applied
    clock_from: int = 0  # the partition's clock it was prepared from

    def __post_init__(self) -> None:
        self.clock_from = self.partition.clock_ns

    def fits(self, partition: Partition) -> bool:
        """Made by this partition object, and nothing written to it since."""
        return self.partition is partition and self.clock_from == partition.clock_ns


@dataclass(slots=True)
class IndexEntry:
    """What the per-device index knows about one device in one partition."""

    device_id: str
    first_ns: int
    last_ns: int
    count: int
    size: int
    dups: int

    def encode(self) -> bytes:
        """Stored bytes of the entry."""
        head = _INDEX.pack(
            _INDEX_VERSION, self.first_ns, self.last_ns, self.count, self.size, self.dups
        )
        return head + self.device_id.encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes) -> IndexEntry:
        """Entry from stored bytes; CorruptRecord when they do not parse."""
        try:
            version, first, last, count, size, dups = _INDEX.unpack_from(raw)
            device = raw[_INDEX.size :].decode("utf-8")
        except (struct.error, UnicodeDecodeError) as exc:
            raise CorruptRecord(f"index entry does not parse: {exc}") from None
        if version != _INDEX_VERSION:
            raise CorruptRecord(f"unknown index entry version {version}")
        return cls(device, first, last, count, size, dups)


# Records: zstd at every level, flushes included (lz4 there left JSON telemetry at 0.59x its
# topic + payload bytes until a compaction; zstd makes it 0.35x), at level 1 (as small as level
# 3 on these blocks, for less CPU), in 16 KiB blocks (a 4 KiB block holds too few records to
# share their keys; a trained dictionary then gained <= 0.01x and made a flush 3.4x as costly).
# Options only: RocksDB reads any table file whatever it was written with, so stores written
# before keep opening. Numbers and what lost: docs/design-notes.md, "Compression".
ZSTD_LEVEL = 1
BLOCK_BYTES = 16 * 1024
_ZSTD_WINDOW_BITS = -14  # RocksDB's default (unused by zstd; the call wants it)


# Memory: left at RocksDB's defaults, every column family of every partition had its own 64 MiB
# memtables (two of them) and its own block cache, so the bridge's RSS grew with what had been
# written and with the number of partitions (90 MiB after 100k messages, 227 MiB after 1M, still
# growing). One write buffer manager and one block cache, for every partition this process opens,
# bound both whatever the partitions and however long it runs. When all memtables together pass
# ~90% of MEMTABLE_BUDGET, RocksDB flushes the largest of the database being written to; writers
# never stall for it (a flush writes table files; the WAL, synced at every commit, is what makes
# a message durable, so memtable sizes change nothing in the guarantees). 32 MiB: a flush of the
# records then holds ~8 MiB at 4 partitions, large enough that the extra flushes and compactions
# cost little CPU (docs/design-notes.md, "Memory"). The index and meta families get small
# memtables of their own: they hold a few bytes per device and per commit.
MEMTABLE_BUDGET = 32 * 1024 * 1024
RECORDS_WRITE_BUFFER = 16 * 1024 * 1024  # one records memtable, before the budget's own flushes
SMALL_WRITE_BUFFER = 4 * 1024 * 1024  # one index or meta memtable
# Table blocks read back (index entries of devices not in the write path's cache, restores):
# one LRU cache of this size for every family of every partition (RocksDB's default is one
# 32 MiB cache per family: 384 MiB at 4 partitions, had it filled).
BLOCK_CACHE_BYTES = 16 * 1024 * 1024
BLOOM_BITS_PER_KEY = 10  # the index and meta families' table filters: ~1% false positives
# Their memtables' filters, as a share of SMALL_WRITE_BUFFER (~80 KiB; ~16 bits an index entry).
MEMTABLE_BLOOM_RATIO = 0.02


@functools.cache
def _shared_memory() -> tuple[WriteBufferManager, Cache]:
    """The process's one write buffer manager and block cache (they outlive every database)."""
    return WriteBufferManager(MEMTABLE_BUDGET, False), Cache(BLOCK_CACHE_BYTES)


def _table(compress: bool) -> BlockBasedOptions:
    table = BlockBasedOptions()
    if compress:
        table.set_block_size(BLOCK_BYTES)
    else:
        # The index is read by device key (the write path's `multi_get` of the devices not in
        # its cache): a filter answers "no entry" for a new device without reading the table's
        # blocks. ~1.25 bytes a device, held with the table; files written without one still read.
        table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)
    table.set_block_cache(_shared_memory()[1])
    return table


def _bound_memory(opts: Options, compress: bool) -> None:
    """Put a family's memtables and blocks under the process's budgets.

    Also applied to options loaded from an OPTIONS file, which cannot carry the shared objects.
    """
    opts.set_write_buffer_manager(_shared_memory()[0])
    opts.set_write_buffer_size(RECORDS_WRITE_BUFFER if compress else SMALL_WRITE_BUFFER)
    opts.set_block_based_table_factory(_table(compress))


def _options(compress: bool) -> Options:
    opts = Options(raw_mode=True)
    _configure(opts, compress)
    return opts


def _configure(opts: Options, compress: bool) -> None:
    """Our settings of a family (records: `compress`), on new or loaded options."""
    if compress:
        opts.set_compression_type(DBCompressionType.zstd())
        opts.set_bottommost_compression_type(DBCompressionType.zstd())
        opts.set_compression_options(_ZSTD_WINDOW_BITS, ZSTD_LEVEL, 0, 0)
    else:
        # A filter in the memtable too: a new device's lookup (the write path's `multi_get`)
        # cost ~1.9 us in a memtable of 25k entries, ~0.5 us with it (docs/design-notes.md).
        opts.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO)
        opts.set_memtable_whole_key_filtering(True)
    _bound_memory(opts, compress)


def _families() -> dict[str, Options]:
    return {CF_INDEX: _options(compress=False), CF_META: _options(compress=False)}


def _writer_options(create: bool) -> Options:
    opts = _options(compress=True)
    _configure_writer(opts, create)
    return opts


def _configure_writer(opts: Options, create: bool) -> None:
    opts.create_if_missing(create)
    opts.create_missing_column_families(True)
    opts.set_keep_log_file_num(3)


# An OPTIONS file with every option at RocksDB's default but one: what `Options.load_latest`
# needs to give options with avoid_flush_during_recovery set. Only options a file names are
# parsed, so this parses with any RocksDB since 4.x (an older version number than the library's
# is read as such; a newer one would make RocksDB skip options it does not know).
_REOPEN_OPTIONS_FILE = f"""\
[Version]
  rocksdb_version=6.0.0
  options_file_version=1.1

[DBOptions]
  avoid_flush_during_recovery=true

[CFOptions "default"]

[CFOptions "{CF_INDEX}"]

[CFOptions "{CF_META}"]
"""


@functools.cache
def _reopen_options() -> tuple[Options, dict[str, Options]] | None:
    """The writer's options plus avoid_flush_during_recovery, which rocksdict cannot set.

    By default opening replays the WAL into a new table file: on a full disk that fails, and
    nothing (not even a delete) can run. With the flag the replayed data stays in memory and
    the WAL is kept until the next flush. rocksdict loads options from a RocksDB OPTIONS file:
    one that sets only the flag is loaded, and our settings are applied to what it gives, as
    to new options (tests/test_compression.py compares the result with the writer's options). A
    few milliseconds; it used to be a scratch database per process (~50-200 ms). None when
    that cannot be done (the default options then serve).
    """
    try:
        with tempfile.TemporaryDirectory(prefix="mqtt-backup-options-") as scratch:
            (Path(scratch) / "OPTIONS-000001").write_text(_REOPEN_OPTIONS_FILE)
            opts, families = Options.load_latest(scratch)
    except Exception:  # noqa: BLE001 - any failure leaves the default options, which work
        return None
    if set(families) != {"default", CF_INDEX, CF_META}:
        return None
    _configure(opts, compress=True)
    _configure_writer(opts, create=False)
    for name, family in families.items():  # the loaded families include the records' (default)
        _configure(family, compress=name not in (CF_INDEX, CF_META))
    return opts, families


def storage_failure(exc: Exception, what: str) -> StorageError:
    """Map rocksdict's bare Exception to our errors by its message."""
    text = str(exc)
    if "lock" in text.lower() and "LOCK" in text:
        return DataDirLocked(f"{what}: {text}", "stop the process that holds it")
    if "Corruption" in text:
        return CorruptRecord(
            f"{what}: {text}", "restore the partition from a snapshot; its files are damaged"
        )
    if "No space left" in text:
        return StorageUnavailable(
            f"{what}: {text}",
            "the disk is full: 'mqtt-backup prune' or 'forget' (not --dry-run) free space with "
            "the reserved ballast; without it, free some space on that disk first",
        )
    return StorageUnavailable(f"{what}: {text}")


class Partition:
    """A RocksDB database holding the devices placement gives it."""

    def __init__(
        self, name: str, path: Path, db: Rdict, writable: bool, cache_entries: int | None = None
    ) -> None:
        self.name = name
        self.path = path
        self._db = db
        self._writable = writable
        self._index = db.get_column_family_handle(CF_INDEX)
        self._meta = db.get_column_family_handle(CF_META)
        self._index_cf = db.get_column_family(CF_INDEX)
        self._meta_cf = db.get_column_family(CF_META)
        # device key -> its index entry as stored (what `IndexEntry.encode` makes)
        self._entries: FifoCache[bytes, bytes] = FifoCache(cache_entries or INDEX_CACHE_ENTRIES)
        self.clock_ns = self._meta_int(META_CLOCK, _U64)
        self.seq = self._meta_int(META_SEQ, _U32)
        self._sync = WriteOptions()
        self._sync.sync = True
        self._unsynced = WriteOptions()  # a unit's writes, made durable at once by `sync`
        self._follows = False
        # Whether RocksDB compacts by itself (off for an operation on a full disk: `open_writer`).
        self.compactions = writable

    @classmethod
    def open_writer(
        cls,
        name: str,
        path: Path,
        create: bool = False,
        compactions: bool = True,
        cache_entries: int | None = None,
    ) -> Partition:
        """Open for writing (creating it only when asked); proves the disk takes a synced write.

        A partition the manifest lists but that is gone is an error, not a new empty history:
        its disk may just not be mounted. Without `compactions` (on a full disk) RocksDB starts
        none by itself until `reclaim()`: one failing for lack of room would make RocksDB refuse
        the compaction that frees space. `cache_entries`: index entries it keeps in memory
        (INDEX_CACHE_ENTRIES when not given).
        """
        if not create and not (path / "CURRENT").is_file():
            raise StorageError(
                f"partition {name} is missing at {path}",
                "mount its disk, or restore the data directory from a snapshot",
            )
        opts, families = _writer_options(create), _families()
        if not create:
            opts, families = _reopen_options() or (opts, families)
        # What sits only in the WAL must be flushed, on a full disk, with the ballast's room.
        opts.set_max_total_wal_size(ballast.wal_bound(path))
        for family in (opts, *families.values()):  # the reopen options are shared: set both ways
            family.set_disable_auto_compactions(not compactions)
        try:
            db = Rdict(str(path), opts, column_families=families)
        except Exception as exc:
            raise storage_failure(exc, f"cannot open partition {name} at {path}") from exc
        part = cls(name, path, db, writable=True, cache_entries=cache_entries)
        part.compactions = compactions
        part._check_format()
        return part

    @classmethod
    def open_reader(cls, name: str, path: Path, secondary: Path | None = None) -> Partition:
        """Open read-only: works beside a running writer, sees what it had synced at open.

        With `secondary` (a scratch directory) it is a RocksDB secondary instance instead, which
        `catch_up()` brings level with the writer at any time (the restore service uses that).
        """
        if not (path / "CURRENT").is_file():
            raise StorageError(f"partition {name} at {path} is missing or not a RocksDB database")
        access = (
            AccessType.read_only(False)
            if secondary is None
            else AccessType.secondary(str(secondary / name))
        )
        try:
            db = Rdict(str(path), _options(compress=True), _families(), access_type=access)
        except Exception as exc:
            raise storage_failure(exc, f"cannot open partition {name} at {path}") from exc
        part = cls(name, path, db, writable=False)
        part._follows = secondary is not None
        return part

    def _meta_int(self, key: bytes, codec: struct.Struct) -> int:
        raw = self._meta_cf.get(key)
        return int(codec.unpack(raw)[0]) if raw is not None else 0

    def _check_format(self) -> None:
        raw = self._meta_cf.get(META_FORMAT)
        if raw is None:
            self._write_meta_only()
            return
        (version,) = _U32.unpack(raw)
        if version != FORMAT_VERSION:
            raise StorageError(
                f"partition {self.name} has record format {version}; this version reads "
                f"{FORMAT_VERSION}"
            )

    def _write_meta_only(self) -> None:
        batch = WriteBatch(raw_mode=True)
        self._put_meta(batch, self.clock_ns, self.seq)
        self._commit(batch)

    def _put_meta(self, batch: WriteBatch, clock_ns: int, seq: int) -> None:
        batch.put(META_FORMAT, _U32.pack(FORMAT_VERSION), self._meta)
        batch.put(META_CLOCK, _U64.pack(clock_ns), self._meta)
        batch.put(META_SEQ, _U32.pack(seq & 0xFFFFFFFF), self._meta)

    def _commit(self, batch: WriteBatch, sync: bool = True) -> None:
        # A write with sync=True is RocksDB's durable write: it returns after the WAL is fsynced,
        # the same as write() then flush_wal(True), with one call.
        try:
            self._db.write(batch, self._sync if sync else self._unsynced)
        except Exception as exc:
            raise storage_failure(exc, f"write to partition {self.name} failed") from exc

    def sync(self) -> None:
        """Make every write made here so far durable (the WAL synced): a unit's writes at its end.

        The WAL is one sequence: a synced write (an ingest commit) makes the earlier ones durable
        too, so unsynced writes are durable in order, never one without those before it.
        """
        try:
            self._db.flush_wal(True)
        except Exception as exc:
            raise storage_failure(exc, f"sync of partition {self.name} failed") from exc

    def write(self, items: Sequence[Pending]) -> None:
        """Store the messages in one synced WriteBatch; nothing changes in memory if it fails."""
        self.apply(self.prepare(items))

    def prepare(self, items: Sequence[Pending]) -> Prepared:
        """The messages encoded into one WriteBatch, with the index entries they make.

        No I/O but one read of the index for the devices not in its cache; nothing changes until
        `apply`. This is the Python half of a write (the synced write releases the GIL): the
        ingest loop does it, so that its commit thread holds the GIL only for a moment. It runs
        once per partition per commit over every message: the loop is kept flat (no calls but
        the packing and the put) for speed. StorageError when the index read fails.
        """
        batch = WriteBatch(raw_mode=True)
        put = batch.put
        clock, seq = self.clock_ns, self.seq
        cached = self._entries.get
        # device key -> its index entry's figures after this batch (lists: cheap to update)
        stats: dict[bytes, _Stats] = {}
        names: dict[bytes, str] = {}
        unread: list[Any] = []  # device keys not in the cache: their entries are read below
        for device, dev_key, received, flags, middle, payload in items:
            clock = received if received > clock else clock + 1
            seq = (seq + 1) & SEQ_MASK
            # records.encode_parts, inlined: the time stamp, then the parts made at receive time.
            # (crc32 chained over the three parts and one join measured slower than this copy.)
            body = _STAMP_PACK(flags, clock) + middle + payload
            value = _HEAD_PACK(FORMAT_VERSION, _crc32(body)) + body
            put(dev_key + key_tail(clock, seq), value)  # keys.record_key, inlined
            dup = flags >> 3 & 1  # records' DUP flag (`records.is_dup`)
            known = stats.get(dev_key)
            if known is not None:
                known[1] = clock
                known[2] += 1
                known[3] += KEY_LEN + len(value)
                known[4] += dup
                continue
            # The device's first message in this batch: its figures made in one go (a fleet
            # that sends each device once comes here for every message).
            raw = cached(dev_key)
            if raw is None:
                stats[dev_key] = [clock, clock, 1, KEY_LEN + len(value), dup]
                unread.append(dev_key)
            else:  # as stored: version, first, last, count, size, dups, then the id
                _, first, _, count, size, dups = _INDEX_UNPACK(raw)  # ~0.25 us more than a copy
                stats[dev_key] = [first, clock, count + 1, size + KEY_LEN + len(value), dups + dup]
            names[dev_key] = device
        if unread:
            self._add_stored(stats, unread)
        index = self._index
        touched = {}  # what the cache holds once applied: the entries as stored
        # `names` was filled beside `stats`, key for key: its values come in the same order.
        for (dev_key, figures), device in zip(stats.items(), names.values(), strict=True):
            entry = _INDEX_PACK(_INDEX_VERSION, *figures) + device.encode()  # IndexEntry.encode
            put(dev_key, entry, index)
            touched[dev_key] = entry
        self._put_meta(batch, clock, seq)
        return Prepared(self, batch, clock, seq, touched)

    def _add_stored(self, stats: dict[bytes, _Stats], dev_keys: list[Any]) -> None:
        """Add the stored index figures of devices the cache did not hold: one read for all.

        A fleet larger than the cache misses on nearly every device of a batch: one `multi_get`
        instead of a point read each. The batch's own figures (first = its first message) stand
        for a device that has no entry yet.
        """
        try:
            # Given a list, rocksdict's get is RocksDB's multi_get: a list back, None if absent.
            found = cast("list[bytes | None]", self._index_cf.get(dev_keys))
        except Exception as exc:
            what = f"reading the index of partition {self.name} failed"
            raise storage_failure(exc, what) from exc
        for dev_key, raw in zip(dev_keys, found, strict=True):
            if raw is not None:
                entry = IndexEntry.decode(raw)
                figures = stats[dev_key]
                figures[0] = entry.first_ns
                figures[2] += entry.count
                figures[3] += entry.size
                figures[4] += entry.dups

    def apply(self, prepared: Prepared) -> None:
        """The synced write of a `prepare` of this partition that `fits` it still."""
        self._commit(prepared.batch)
        self.clock_ns, self.seq = prepared.clock_ns, prepared.seq
        self._entries.put_all(prepared.touched)  # on the commit thread, with the GIL: one update

    @property
    def cached_entries(self) -> int:
        """Index entries held in memory now (bounded by its share of INDEX_CACHE_ENTRIES)."""
        return len(self._entries)

    def index_entry(self, dev_key: bytes) -> IndexEntry | None:
        """The device's index entry in this partition, if it has messages here."""
        raw = self._index_cf.get(dev_key)
        return IndexEntry.decode(raw) if raw is not None else None

    def index_entries(self) -> Iterator[tuple[bytes, IndexEntry]]:
        """Every (device key, index entry) in this partition, in device-key order."""
        it = self._index_cf.iter()
        it.seek_to_first()
        while it.valid():
            yield it.key(), IndexEntry.decode(it.value())
            it.next()
        self._check(it)

    def _check(self, it: RdictIter) -> None:
        # An iterator ends quietly at a damaged block; only status() tells an end from an error.
        try:
            it.status()
        except Exception as exc:
            raise storage_failure(exc, f"reading partition {self.name} failed") from exc

    def scan(
        self,
        dev_key: bytes,
        since_ns: int | None = None,
        until_ns: int | None = None,
        reverse: bool = False,
        after: bytes | None = None,
    ) -> Generator[tuple[bytes, bytes]]:
        """(key, value) of one device's messages in [since, until): a seek, then a short scan.

        `after`: the last key an earlier chunk read; the scan goes on past it (in its direction).
        """
        lower, upper = device_range(dev_key, since_ns, until_ns)
        if after is not None and reverse:
            upper = min(upper, after)
        elif after is not None:
            lower = max(lower, after + b"\x00")  # the smallest key above `after`
        opts = ReadOptions()
        # rocksdict honours the upper bound but not the lower one: the reverse walk checks it.
        opts.set_iterate_upper_bound(upper)
        it = self._db.iter(opts)
        if reverse:
            it.seek_to_last()
        else:
            it.seek(lower)
        while it.valid():
            key = it.key()
            if key < lower:
                return
            if len(key) == KEY_LEN:
                yield key, it.value()
            if reverse:
                it.prev()
            else:
                it.next()
        self._check(it)

    def read_range(
        self,
        dev_key: bytes,
        since_ns: int | None,
        until_ns: int | None,
        reverse: bool,
        after: bytes | None,
        limit: int,
        max_bytes: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Up to `limit` (key, value) of `scan`, its iterator closed before it returns.

        With `max_bytes`, it ends once the values read reach that many bytes (one at least).
        A live iterator keeps the database open (see storage/lease.py): a chunk never outlives
        the read lease it was taken under.
        """
        if reverse:
            return self._read_checked(dev_key, since_ns, until_ns, True, after, limit, max_bytes)
        # Forward (every restore unless it asks for newest first): the chunk through rocksdict's
        # item iterator, one call per record instead of five (a quarter of the time). That
        # iterator ends quietly at a damaged block, so wherever it runs out the rest of the
        # range is read by `scan`, whose end is checked: a chunk is short only at the true end.
        lower, upper = device_range(dev_key, since_ns, until_ns)
        if after is not None:
            lower = max(lower, after + b"\x00")  # the smallest key above `after`
        opts = ReadOptions()
        opts.set_iterate_upper_bound(upper)
        # The item iterator points into `opts` (its upper bound) without keeping it alive: a
        # dropped `opts` let it read on into other devices' records. It goes first, here.
        items = self.forward_items(lower, opts)
        found, ran_out, spent = _take(items, limit, max_bytes)
        del items  # closes its RocksDB iterator now, under the caller's read lease
        if found and found[-1][0] >= upper:  # the bound not honoured: never another device's
            found, ran_out = found[: bisect_left(found, (upper,))], True
            spent = sum(map(len, map(_VALUE_OF, found)))
        if set(map(len, map(_KEY_OF, found))) - {KEY_LEN}:  # stray keys (damage): rare
            return self._read_checked(dev_key, since_ns, until_ns, False, after, limit, max_bytes)
        if not ran_out:
            return found
        last = found[-1][0] if found else after
        left = max_bytes - spent if max_bytes is not None else None
        more = limit - len(found)
        return found + self._read_checked(dev_key, since_ns, until_ns, False, last, more, left)

    def forward_items(self, lower: bytes, opts: ReadOptions) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) from `lower` on, in key order, within `opts`' bounds (`read_range`).

        Unchecked: it ends quietly at a damaged block. Every key, of any length. An open
        RocksDB iterator until it is dropped, which must be before `opts` is.
        """
        return self._db.items(from_key=lower, read_opt=opts)  # type: ignore[return-value]

    def _read_checked(
        self,
        dev_key: bytes,
        since_ns: int | None,
        until_ns: int | None,
        reverse: bool,
        after: bytes | None,
        limit: int,
        max_bytes: int | None,
    ) -> list[tuple[bytes, bytes]]:
        found: list[tuple[bytes, bytes]] = []
        if limit <= 0:
            return found
        budget = max_bytes if max_bytes is not None else -1
        scan = self.scan(dev_key, since_ns, until_ns, reverse, after)
        try:
            for item in scan:
                found.append(item)
                if len(found) >= limit:
                    break
                if budget >= 0:
                    budget -= len(item[1])
                    if budget <= 0:
                        break
        finally:
            scan.close()
        return found

    def records(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) in the records family, in key order (a full scan: verify, moves)."""
        opts = ReadOptions()
        # A full scan must not evict the bridge's working set (the stub lacks the flag).
        opts.fill_cache(False)  # type: ignore[call-arg]
        it = self._db.iter(opts)
        it.seek_to_first()
        while it.valid():
            yield it.key(), it.value()
            it.next()
        self._check(it)

    def disk_bytes(self) -> int:
        """Bytes of data on disk: table files and write-ahead logs (not RocksDB's own logs)."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.suffix in (".sst", ".log"))

    def estimated_keys(self) -> int:
        """RocksDB's estimate of the number of records (cheap; exact counts are in the index)."""
        return self._db.property_int_value("rocksdb.estimate-num-keys") or 0

    def family_figures(self, prop: str) -> list[int]:
        """A RocksDB integer property of each family: records, index, meta (0 when unknown).

        E.g. `rocksdb.cur-size-all-mem-tables`, what MEMTABLE_BUDGET bounds over all partitions.
        """
        return [
            family.property_int_value(prop) or 0
            for family in (self._db, self._index_cf, self._meta_cf)
        ]

    def checkpoint(self, dest: Path) -> None:
        """A consistent copy of this partition at `dest` (hard links where possible).

        Taken from the writer's handle it includes everything committed, WAL included; from a
        read-only handle it would miss what is only in the WAL.
        """
        try:
            Checkpoint(self._db).create_checkpoint(str(dest))
        except Exception as exc:
            raise storage_failure(exc, f"cannot checkpoint partition {self.name}") from exc

    def measure(self, dev_key: bytes, until_ns: int | None = None) -> Removal:
        """What deleting the device's messages received before `until_ns` would remove."""
        removal = Removal()
        for key, value in self.scan(dev_key, None, until_ns):
            removal.add(len(key) + len(value), _is_dup(value))
        return removal

    def keep_newest_start(self, dev_key: bytes, budget: int) -> int | None:
        """Receive time of the oldest message kept when the device may use `budget` bytes.

        None when the device fits the budget; everything older than the result goes.
        """
        used = 0
        for key, value in self.scan(dev_key, reverse=True):
            used += len(key) + len(value)
            if used > budget:
                return split_key(key)[1] + 1
        return None

    def delete_device_range(
        self, dev_key: bytes, until_ns: int | None = None, *, sync: bool = True
    ) -> Removal:
        """Delete the device's messages received before `until_ns` (all when None).

        One range delete and the index update in one batch, synced unless `sync` is False (a
        move's unit syncs once at its end); returns what went.
        """
        removal = self.measure(dev_key, until_ns)
        if removal.count == 0:
            return removal
        lower, upper = device_range(dev_key, None, until_ns)
        batch = WriteBatch(raw_mode=True)
        batch.delete_range(lower, upper)
        entry = self.index_entry(dev_key)
        # What stays: the first message at or after the cut (nothing when everything goes).
        remaining = None if until_ns is None else next(self.scan(dev_key, until_ns, None), None)
        if entry is None or remaining is None:
            batch.delete(dev_key, self._index)
        else:
            entry.first_ns = split_key(remaining[0])[1]
            entry.count -= removal.count
            entry.size -= removal.size
            entry.dups -= removal.dups
            batch.put(dev_key, entry.encode(), self._index)
        self._commit(batch, sync)
        self._entries.pop(dev_key)
        return removal

    def reclaim(self, dev_keys: Sequence[bytes]) -> bool:
        """Try to give back the disk space of what was deleted for these devices.

        A delete only adds a tombstone: the space returns when the memtables are flushed (the
        WAL holding the deleted data then goes) and the table files holding the devices'
        ranges are compacted, which needs room for what they keep, for a moment. Without that
        room the deletes still stand and RocksDB's own compactions reclaim the space later:
        False then, and the handle must be reopened before it writes again.
        """
        try:
            if dev_keys:
                lower, upper = device_range(min(dev_keys))[0], device_range(max(dev_keys))[1]
                for family in (self._db, self._index_cf, self._meta_cf):
                    family.flush(True)
                self._db.compact_range(lower, upper)
            self.allow_compactions()
        except Exception as exc:  # noqa: BLE001 - rocksdict raises bare Exceptions
            log.warning("could not reclaim the space of partition %s yet: %s", self.name, exc)
            return False
        return True

    def allow_compactions(self) -> None:
        """Let RocksDB compact by itself again (after an open without compactions).

        A handle broken by an I/O error refuses; the next open starts with compactions on.
        """
        with contextlib.suppress(Exception):
            for family in (self._db, self._index_cf, self._meta_cf):
                family.set_options({"disable_auto_compactions": "false"})
            self.compactions = True

    def copy_device_from(self, source: Partition, dev_key: bytes, batch_size: int = 5000) -> int:
        """Make this partition hold exactly the device's messages and index entry of `source`.

        Idempotent (keys are copied as they are): a move interrupted anywhere is finished by
        running it again. Raises this partition's clock to the device's last receive time, so
        later messages of the device still sort after the moved ones. Returns messages copied.
        """
        self.delete_device_range(dev_key)  # a stale copy of an earlier, interrupted move
        if source.index_entry(dev_key) is None:
            return 0
        copied, after = 0, None
        while True:
            after, count = self.copy_keys_from(source, dev_key, after, batch_size)
            copied += count
            if count < batch_size:
                return copied

    def copy_keys_from(
        self,
        source: Partition,
        dev_key: bytes,
        after: bytes | None,
        limit: int,
        *,
        entry: bool = True,
        sync: bool = True,
    ) -> tuple[bytes | None, int]:
        """Copy up to `limit` of the device's records that follow key `after` in `source`.

        Keys are copied as they are (a copy done twice is the same copy), in writes of at most
        COPY_BYTES of values each (a unit counts records: large payloads must not all be held at
        once), the last synced unless `sync` is False. Returns the last key copied (`after` when
        none) and how many were: fewer than `limit` means the device's end in `source` was
        reached, and then (with `entry`) its index entry is taken from `source` in the last
        write, and this partition's clock raised to the device's last receive time, so its later
        messages sort after these.
        """
        copied = 0
        while True:
            want = limit - copied
            rows = source.read_range(dev_key, None, None, False, after, want, COPY_BYTES)
            cut = sum(len(value) for _, value in rows) >= COPY_BYTES  # by bytes, not at the end
            ended = len(rows) < want and not cut
            last = ended or len(rows) == want
            self._copy_rows(source, dev_key, rows, entry and ended, sync and last)
            copied += len(rows)
            after = rows[-1][0] if rows else after
            if last:
                return after, copied

    def _copy_rows(
        self,
        source: Partition,
        dev_key: bytes,
        rows: list[tuple[bytes, bytes]],
        entry: bool,
        sync: bool,
    ) -> None:
        """One write of `copy_keys_from`: the rows, and (with `entry`) the device's entry."""
        batch = WriteBatch(raw_mode=True)
        for key, value in rows:
            batch.put(key, value)
        taken = source.index_entry(dev_key) if entry else None
        clock = self.clock_ns
        if taken is not None:
            clock = max(clock, taken.last_ns)
            batch.put(dev_key, taken.encode(), self._index)
            self._put_meta(batch, clock, self.seq)
        if rows or taken is not None:
            self._commit(batch, sync)
        if taken is not None:
            self.clock_ns = clock
            self._entries.pop(dev_key)

    def reindex(self, dev_key: bytes, device_id: str, *, changed_only: bool = False) -> None:
        """Count the device's records here again and write its index entry (after a merge).

        A device copied into the partition that already receives its new messages (a rebalance
        finishing a move the layout made earlier) ends with records from both: the entry is
        made from what is there, in one scan. `changed_only`: written only when the stored
        entry says otherwise (a check, nothing to sync when it is right).
        """
        first = last = count = size = dups = 0
        for key, value in self.scan(dev_key):
            ts = split_key(key)[1]
            first = ts if count == 0 else first
            last = ts
            count += 1
            size += len(key) + len(value)
            dups += _is_dup(value)
        counted = IndexEntry(device_id, first, last, count, size, dups)
        if count and not (changed_only and self.index_entry(dev_key) == counted):
            self._put_entry(dev_key, counted)

    def _put_entry(self, dev_key: bytes, entry: IndexEntry) -> None:
        clock = max(self.clock_ns, entry.last_ns)
        batch = WriteBatch(raw_mode=True)
        batch.put(dev_key, entry.encode(), self._index)
        self._put_meta(batch, clock, self.seq)
        self._commit(batch)
        self.clock_ns = clock
        self._entries.pop(dev_key)

    def last_key(self, dev_key: bytes) -> bytes | None:
        """The device's newest record key here (None when it has none)."""
        found = self.read_range(dev_key, None, None, True, None, 1)
        return found[0][0] if found else None

    def has_key(self, key: bytes) -> bool:
        """Whether this partition holds a record under `key`."""
        return self._db.get(key) is not None

    def catch_up(self) -> None:
        """A secondary instance reads what the writer committed since (WAL included).

        A read-only or writing handle has nothing to catch up with.
        """
        if not self._follows:
            return
        try:
            self._db.try_catch_up_with_primary()
        except Exception as exc:
            raise storage_failure(exc, f"cannot read partition {self.name}") from exc

    def close(self) -> None:
        """Close the database (flushes nothing: the WAL already holds every commit)."""
        self._entries.clear()
        # Closing a handle after an I/O error may raise again; it is gone either way.
        with contextlib.suppress(Exception):
            self._db.close()


@dataclass(slots=True)
class Removal:
    """What a delete takes away: messages, stored bytes, redelivered copies."""

    count: int = 0
    size: int = 0
    dups: int = 0

    def add(self, size: int, dup: bool) -> None:
        """Count one message."""
        self.count += 1
        self.size += size
        self.dups += int(dup)

    def merge(self, other: Removal) -> None:
        """Add another removal to this one."""
        self.count += other.count
        self.size += other.size
        self.dups += other.dups


def _is_dup(value: bytes) -> bool:
    return decode_record(value)[1].dup
