"""The partitioned store: a manifest, N partitions, placement, the lock, the gap log."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mqtt_backup.errors import ForeignDataDir, StorageError, StorageUnavailable, UsageError
from mqtt_backup.keys import device_key, split_key
from mqtt_backup.placement import Placement
from mqtt_backup.records import Record, decode_record
from mqtt_backup.storage import ballast
from mqtt_backup.storage.files import PRIVATE_UMASK_HOLD, DirLock, fsync_dir, make_private
from mqtt_backup.storage.journal import STATE, GapLog
from mqtt_backup.storage.lease import Lease
from mqtt_backup.storage.manifest import (
    MANIFEST,
    Manifest,
    PartitionSpec,
    layout_problem,
    load_manifest,
    manifest_path,
    new_manifest,
    save_manifest,
)
from mqtt_backup.storage.partition import Partition, Pending, Prepared, index_cache_share
from mqtt_backup.topics import filter_matches

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 1
PARTITIONS = "partitions"
_MIN_FREE_BYTES = ballast.FULL_BELOW_BYTES
# A chunk read ends once its values reach this many bytes (always one record at least): counted
# in records alone, 512 one-MB payloads were half a GB held by each restore.
CHUNK_BYTES = 1 << 20

__all__ = ["Cursor", "DeviceInfo", "LiveReader", "Pending", "Store", "StoreReader", "StoredMessage"]


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device as `mqtt-backup devices` lists it."""

    device: str
    first_ns: int
    last_ns: int
    count: int
    size: int
    dups: int
    partition: str


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A record read back, with its device and place in the key order."""

    device: str
    ts_ns: int
    seq: int
    record: Record


@dataclass(slots=True)
class Cursor:
    """Where a chunked read of one device's messages stands: resumed by key, not by position.

    Keys are copied unchanged when a device moves, so a read that goes on in the device's new
    partition after a move continues past the same key: every message reads exactly once.
    """

    device: str
    since_ns: int | None = None
    until_ns: int | None = None
    reverse: bool = False
    after: bytes | None = None  # the last key read
    done: bool = False


def _read_rows(part: Partition, cursor: Cursor, limit: int) -> list[tuple[bytes, bytes]]:
    """The next (up to) `limit` (key, stored bytes) of the cursor's device in `part`; moves it.

    The chunk also ends once its values reach CHUNK_BYTES (one record at least). The end of
    an oldest-first read is fixed at its first read (`_fix_open_end`).
    """
    if not cursor.reverse and cursor.after is None:
        _fix_open_end(part, cursor)
        if cursor.done:
            return []
    rows = part.read_range(
        device_key(cursor.device),
        cursor.since_ns,
        cursor.until_ns,
        cursor.reverse,
        cursor.after,
        limit,
        CHUNK_BYTES,
    )
    # Short of both bounds: the scan ran out.
    cursor.done = len(rows) < limit and sum(len(value) for _, value in rows) < CHUNK_BYTES
    if rows:
        cursor.after = rows[-1][0]
    return rows


def _fix_open_end(part: Partition, cursor: Cursor) -> None:
    """End an oldest-first read after the device's last message in its window stored now.

    Read to whatever is last, a read of a device that sends faster than it is read would never
    end (also with an `until` still to come: "until tomorrow"). A device's receive times only
    grow (its partition's clock is strictly monotonic, and a move raises the new partition's
    clock to the device's last time), so every message stored before this read is below the
    bound, and every later one at or above it. Newest first needs no bound: it starts at the
    top and reads away from what arrives.
    """
    last = part.read_range(
        device_key(cursor.device), cursor.since_ns, cursor.until_ns, True, None, 1
    )
    if last:  # below `until`, if any: the bound only comes closer
        cursor.until_ns = split_key(last[0][0])[1] + 1
    else:
        cursor.done = True  # nothing in the window yet: nothing arrived before the request


def _messages(device: str, rows: list[tuple[bytes, bytes]]) -> list[StoredMessage]:
    found = []
    for key, value in rows:
        ts_ns, record = decode_record(value)
        found.append(StoredMessage(device, ts_ns, split_key(key)[2], record))
    return found


def _check_data_dir(data_dir: Path, need_space: bool = True) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise StorageError(f"{data_dir} exists and is not a directory", "choose another --data")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {data_dir}: {exc.strerror or exc}") from exc
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise StorageError(f"{data_dir} is not writable by this user", "fix its permissions")
    free = shutil.disk_usage(data_dir).free
    if need_space and free < _MIN_FREE_BYTES:
        raise StorageUnavailable(
            f"only {free // 1024} KiB free on the disk holding {data_dir}", "free some space"
        )


class Store:
    """The writer of a data directory. One per directory: the directory is locked while open."""

    def __init__(self, data_dir: Path, manifest: Manifest, lock: DirLock) -> None:
        self.data_dir = data_dir
        self.manifest = manifest
        self.gaps = GapLog(data_dir)
        self._lock = lock
        self._place = Placement(manifest.weighted)
        self.partitions: dict[str, Partition] = {}
        # Set when an operation found the disk full: it reclaims what it deletes at once.
        self.freeing_space = False
        self.created_dir = False
        self.created_layout = False
        self._found: frozenset[str] = frozenset()  # what the directory held before this open
        self._holds_umask = False
        # Reads through these handles (LiveReader) hold it shared; opening or closing them holds
        # it exclusive. `opened` counts the opens: a fallback reader knows when it is stale.
        self.lease = Lease()
        self.opened = 0
        # Called under the exclusive lease once the writer's handles are open again, and at the
        # close: readers drop the read-only handles a storage failure made them open (left
        # open, they pin table files that a prune or forget deletes).
        self.drop_read_only: list[Callable[[], None]] = []
        self.closed = False
        # Devices written since a move began watching (None: no move watches): a move copies
        # them again before its switch, so nothing a commit between its units stored is left behind.
        self._written: set[bytes] | None = None

    @classmethod
    def open(
        cls,
        data_dir: Path,
        partitions: int | None = None,
        client_id: str | None = None,
        create: bool = True,
        *,
        to_free_space: bool = False,
    ) -> Store:
        """Open (or create) the data directory for writing; StorageError says why it cannot.

        `to_free_space`: the caller deletes (prune, forget), so on a full disk it may release the
        ballast to open; nothing else spends that reserve.

        While it is open, whatever this process creates is private to its owner (files 0600,
        directories 0700, RocksDB's own included), and an existing store is made so at opening.
        """
        PRIVATE_UMASK_HOLD.hold()
        try:
            store = cls._open(data_dir, partitions, client_id, create, to_free_space)
        except BaseException:
            PRIVATE_UMASK_HOLD.release()
            raise
        store._holds_umask = True
        return store

    @classmethod
    def _open(
        cls,
        data_dir: Path,
        partitions: int | None,
        client_id: str | None,
        create: bool,
        to_free_space: bool,
    ) -> Store:
        if not create:
            load_manifest(data_dir)  # DataDirMissing, with a hint, when there is nothing to open
        existed = data_dir.exists()
        # Operations on an existing store (prune, forget) must work on a full disk: they free it.
        _check_data_dir(data_dir, need_space=create)
        found = _refuse_foreign(data_dir)  # before the lock: its LOCK file may be another's
        lock = DirLock(data_dir)
        lock.acquire()
        try:
            store = cls(data_dir, _load_manifest(data_dir, partitions, client_id), lock)
            store.created_dir = not existed
            store._found = found
            if store.manifest is _UNSAVED:
                store.created_layout = True
                store.create(partitions or DEFAULT_PARTITIONS, client_id)
            else:
                if to_free_space:
                    store.make_room()  # a prune or forget on a full disk must be able to open it
                store.open_partitions()
                store.bury_retired()
            store.make_private(say=not store.created_layout)  # a new layout has nothing to report
            store.keep_ballast()
        except BaseException:
            lock.release()
            if not existed:
                _remove_new_dir(data_dir)
            raise
        return store

    def create(self, partitions: int, client_id: str | None) -> None:
        """Lay out a new data directory: the partitions first, the manifest last.

        The manifest is the commit point: a crash before it leaves a directory that the next
        start simply lays out again.
        """
        self.manifest = new_manifest(partitions, client_id)
        self._place = Placement(self.manifest.weighted)
        self.open_partitions(create=True)
        save_manifest(self.data_dir, self.manifest)

    def discard_new(self) -> None:
        """Close, and undo what this store created (start-up failed: bad input changes nothing)."""
        self.close()
        if self.created_dir:
            _remove_new_dir(self.data_dir)
        elif self.created_layout:
            # An existing directory keeps what it had: only what this start made goes.
            for name in _LAYOUT - self._found:
                path = self.data_dir / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def keep_client_id(self) -> None:
        """Write a client id given on the command line to the manifest (after it connected)."""
        if load_manifest(self.data_dir).client_id != self.manifest.client_id:
            save_manifest(self.data_dir, self.manifest)

    @property
    def client_id(self) -> str:
        """The bridge's stable MQTT client id, kept in the manifest."""
        return self.manifest.client_id

    def open_partitions(self, create: bool = False) -> None:
        """Open every partition's database (again, after a failure)."""
        with self.lease.exclusive():
            self.close_partitions()
            self.opened += 1
            try:
                share = index_cache_share(len(self.manifest.partitions))
                for spec in self.manifest.partitions:
                    path = spec.directory(self.data_dir)
                    if create:
                        path.mkdir(parents=True, exist_ok=True)
                    self.partitions[spec.name] = Partition.open_writer(
                        spec.name, path, create, not self.freeing_space, share
                    )
            except BaseException:
                self.close_partitions()  # all or none: a half-open store would hold RocksDB locks
                raise
            self._drop_read_only()

    def _drop_read_only(self) -> None:
        for drop in list(self.drop_read_only):
            drop()

    def make_room(self, stalled: bool = False) -> bool:
        """On a full disk, release the ballast so an operation can open, delete and reclaim.

        `stalled`: writes are failing (a running bridge's ingest is stalled), which counts as a
        full disk whatever a free-space reading says for a moment (a failed flush or compaction
        has just deleted its partial file). True when it released: the store is then
        `freeing_space` (partitions open without automatic compactions, the operation reclaims
        what it deletes) until `done_freeing()`.
        """
        if not stalled and not ballast.short_of_space(self.data_dir):
            return False
        ballast.release(self.data_dir)
        self.freeing_space = True
        if any(part.compactions for part in self.partitions.values()):
            # Open from before (a running bridge whose last write got through): a compaction of
            # RocksDB's own, pending on a full disk, would spend the released room rewriting
            # what the operation is about to delete, and fail its flush and reclaim (ENOSPC).
            # Closing stops it; they open again without.
            try:
                self.open_partitions()
            except BaseException:
                self.done_freeing(deleted=False)  # nothing deleted: the room is ballast again
                raise
        return True

    def done_freeing(self, deleted: bool = True) -> None:
        """The operation ended: compactions on again, and the ballast back when there is room.

        Compactions come back even when the ballast cannot (the operation freed less than the
        ballast plus the bar for a full disk): RocksDB's own compactions then reclaim what the
        operation's did not, and the ballast returns once they have. `deleted`: False when the
        operation removed nothing (a prune with nothing old enough): the released room is then
        taken back as ballast at once, before held ingest can fill it, so that the next
        operation on the still-full disk can open.
        """
        if self.freeing_space:
            self.freeing_space = False
            for part in self.partitions.values():
                part.allow_compactions()
            if not deleted:
                ballast.retake(self.data_dir)
        self.keep_ballast()

    def keep_ballast(self) -> None:
        """Make the ballast again when the disk has room for it (cheap: call it often)."""
        ballast.keep(self.data_dir)

    def ensure_open(self) -> None:
        """Open the partitions again when a storage failure closed them."""
        if set(self.partitions) != {spec.name for spec in self.manifest.partitions}:
            self.open_partitions()

    def close_partitions(self) -> None:
        """Drop every database handle (rocksdict has no resume after an I/O error)."""
        with self.lease.exclusive():
            for part in self.partitions.values():
                part.close()
            self.partitions.clear()

    def drop_partition(self, name: str) -> None:
        """Close one partition's handle (a partition an interrupted add opened)."""
        with self.lease.exclusive():
            part = self.partitions.pop(name, None)
            if part is not None:
                part.close()

    def home(self, dev_key: bytes) -> str:
        """The partition placement gives this device key now (uncached: any thread)."""
        return self._place(dev_key)

    def locate(self, device_id: str) -> tuple[str, bytes]:
        """(partition name, device key) of a device, by placement (any thread).

        Not cached here: the ingest path calls it once per new topic, and its route map keeps
        the answer with the rest of the route (a cache here, 16,384 devices, cost a lookup and
        an insertion per new device and held a second copy; docs/design-notes.md, "Memory:
        bounded per-message caches"). An operation's `switch` replaces the placement in one
        assignment, so an answer is from the old layout or the new one, never a mix.
        """
        dev_key = device_key(device_id)
        return self._place(dev_key), dev_key

    def prepare(self, partition: str, items: Sequence[Pending]) -> Prepared | None:
        """The Python half of `write` for these items, done ahead (None: not open now).

        StorageError when an index read fails.
        """
        part = self.partitions.get(partition)
        return None if part is None else part.prepare(items)

    def write(
        self, partition: str, items: Sequence[Pending], prepared: object | None = None
    ) -> None:
        """Store items in one partition with a synced WAL; StorageUnavailable when it fails.

        `prepared`: what `prepare` made of the same items, used when it still fits the partition.
        """
        part = self.partitions.get(partition)
        if part is None:
            raise StorageUnavailable(f"partition {partition} is not open")
        if not (isinstance(prepared, Prepared) and prepared.fits(part)):
            prepared = part.prepare(items)
        part.apply(prepared)
        if self._written is not None:
            self._written.update(prepared.touched)

    def watch_writes(self, on: bool) -> None:
        """Start (or stop) noting which devices `write` stores messages of (`written`)."""
        self._written = set() if on else None

    def written(self) -> set[bytes]:
        """The device keys written since the last call (or since watching began)."""
        found = self._written
        if found is None:
            return set()
        self._written = set()
        return found

    def open_new_partition(self, spec: PartitionSpec) -> Partition:
        """Open (creating it when needed) a partition that the manifest does not list yet."""
        path = spec.directory(self.data_dir)
        self._check_new_path(spec)
        mark = f"{self.client_id} {spec.name}\n"
        try:
            if path.exists() and any(path.iterdir()):
                ours = (path / _ADDING).is_file() and (path / _ADDING).read_text() == mark
                if not ours:  # another store's partition, a snapshot, anything else: hands off
                    raise UsageError(f"{path} is not empty", "choose another --path")
            else:
                _create_partition_dir(spec.name, path, mark)
        except OSError as exc:
            raise UsageError(f"cannot use {path}: {exc.strerror or exc}") from exc
        # Its share of the index cache as one more partition (the others keep theirs until they
        # are opened again): the budget stays per store, not per partition.
        share = index_cache_share(len(self.manifest.partitions) + 1)
        part = Partition.open_writer(spec.name, path, cache_entries=share)
        with self.lease.exclusive():
            self.partitions[spec.name] = part
        return part

    def _check_new_path(self, spec: PartitionSpec) -> None:
        """UsageError when a new partition's directory would sit on the store's own files."""
        shown = str(spec.directory(self.data_dir))  # what was typed is the CLI's to name
        error = new_partition_error(self.data_dir, self.manifest, spec, shown)
        if error is not None:
            raise error

    def switch(self, manifest: Manifest) -> None:
        """Make `manifest` the layout, atomically on disk; close partitions it no longer lists.

        Under the exclusive lease: a read sees the old layout and its partitions, or the new.
        """
        with self.lease.exclusive():
            save_manifest(self.data_dir, manifest)
            for spec in manifest.partitions:  # an added partition is ours for good now
                (spec.directory(self.data_dir) / _ADDING).unlink(missing_ok=True)
            self.manifest = manifest
            self._place = Placement(manifest.weighted)
            listed = {spec.name for spec in manifest.partitions}
            for name in [n for n in self.partitions if n not in listed]:
                self.partitions.pop(name).close()
            self._drop_read_only()  # one of a partition now retired would pin its files

    def bury_retired(self) -> None:
        """Delete the files of retired partitions, then forget them (finishes a remove)."""
        if not self.manifest.retired:
            return
        for spec in self.manifest.retired:
            shutil.rmtree(spec.directory(self.data_dir), ignore_errors=True)
        self.switch(dataclasses.replace(self.manifest, retired=()))

    def make_private(self, say: bool = True) -> None:
        """Take group and other permissions off the store's files; log what changed, once."""
        home = self.data_dir.resolve()
        away = [d for d in self._directories() if not d.resolve().is_relative_to(home)]
        done = make_private([self.data_dir, *away])
        if done.tightened and say:
            log.info(
                "made %s private to its owner: %d files and folders were open to other users",
                self.data_dir,
                done.tightened,
            )
        if done.refused:
            path, uid = done.refused[0]
            log.warning(
                "cannot make %s private (owned by uid %d): other local users may read the stored "
                "messages; run 'chmod -R go= %s' as its owner",
                path,
                uid,
                path,
            )

    def _directories(self) -> list[Path]:
        return [s.directory(self.data_dir) for s in self.manifest.partitions]

    def close(self) -> None:
        """Close every partition, release the directory lock and the private umask."""
        with self.lease.exclusive():
            self.closed = True  # a chunk that comes late (a queued thread) opens nothing
            self.close_partitions()
            self._drop_read_only()
        self._lock.release()
        if self._holds_umask:
            self._holds_umask = False
            PRIVATE_UMASK_HOLD.release()


_ADDING = "MQTT_BACKUP_ADDING"


def new_partition_error(
    data_dir: Path, manifest: Manifest, spec: PartitionSpec, shown: str
) -> UsageError | None:
    """Why `spec` cannot join this layout (None: it can); `shown` names its directory.

    The CLI asks first, naming --path as it was typed; the store asks again when it opens it.
    """
    path = spec.directory(data_dir).resolve()
    if path.is_relative_to(data_dir.resolve()) and path.parent != (data_dir / PARTITIONS).resolve():
        # Everything else in the data directory is the store's own (the restore reader's
        # scratch space is wiped at every start).
        return UsageError(
            f"{shown} lies among the data directory's own files",
            f"leave --path out ({spec.name} then goes to {data_dir / PARTITIONS / spec.name}), "
            f"or choose a directory outside {data_dir}",
        )
    # Not against retired partitions: an add buries them first (a remove stopped before it).
    problem = layout_problem(data_dir, (*manifest.partitions, spec))
    if problem:
        return UsageError(f"{shown}: {problem}", "choose a directory of its own")
    return None


def _create_partition_dir(name: str, path: Path, mark: str) -> None:
    # Created aside and renamed into place: a crash never leaves a half-made database at `path`.
    # The mark lets a re-run of the same interrupted add (and nothing else) take it over.
    making = path.with_name(f".{path.name}.creating")
    shutil.rmtree(making, ignore_errors=True)
    making.mkdir(parents=True)
    Partition.open_writer(name, making, create=True).close()
    (making / _ADDING).write_text(mark)
    path.parent.mkdir(parents=True, exist_ok=True)
    making.rename(path)
    fsync_dir(path.parent)


# Stands for "no manifest yet": Store.open then lays out a new data directory.
_UNSAVED = Manifest(0, "", ())
# A reader with no partitions open.
_NO_LAYOUT = Manifest(0, "", ())


def _remove_new_dir(data_dir: Path) -> None:
    # Only ever called for a directory this process created moments ago.
    shutil.rmtree(data_dir, ignore_errors=True)


# What a start lays out before its manifest exists (and `discard_new` takes back).
_LAYOUT = frozenset(
    {MANIFEST, f"{MANIFEST}.tmp", "LOCK", PARTITIONS, STATE, ballast.BALLAST, ballast.MAKING}
)
# Names a file system puts in a new volume's root: a mounted disk is still an empty directory.
_VOLUME = frozenset({"lost+found"})


def _refuse_foreign(data_dir: Path) -> frozenset[str]:
    """What the directory holds; ForeignDataDir when that is neither nothing nor ours.

    Ours is a manifest, or the start of a layout that a crash cut short before its manifest.
    Anything else (another program's database, someone's files) is not touched at all.
    """
    try:
        found = frozenset(entry.name for entry in data_dir.iterdir())
    except OSError as exc:
        raise StorageError(f"cannot list {data_dir}: {exc.strerror or exc}") from exc
    if MANIFEST in found or (found <= _LAYOUT | _VOLUME and _new_partitions_only(data_dir)):
        return found
    shown = ", ".join(sorted(found - _LAYOUT - _VOLUME)[:3] or [f"{PARTITIONS}/..."])
    raise ForeignDataDir(
        f"{data_dir} holds other files ({shown}) and no {MANIFEST}",
        "give --data an empty or new directory; mqtt-backup will not write into this one",
    )


def _new_partitions_only(data_dir: Path) -> bool:
    # A layout cut short holds only the partitions a new manifest names: p0, p1, ...
    try:
        return all(re.fullmatch(r"p\d+", e.name) for e in (data_dir / PARTITIONS).iterdir())
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _load_manifest(data_dir: Path, partitions: int | None, client_id: str | None) -> Manifest:
    if not manifest_path(data_dir).exists():
        return _UNSAVED
    manifest = load_manifest(data_dir)
    have = len(manifest.partitions)
    if partitions is not None and partitions != have:
        raise UsageError(
            f"{data_dir} has {have} partitions, not {partitions}",
            "drop --partitions, or change the set with 'mqtt-backup partitions add/remove'",
        )
    if client_id is not None and client_id != manifest.client_id:
        # Kept in memory only: Store.keep_client_id saves it once the broker took it.
        manifest = manifest.with_client_id(client_id)
    return manifest


class StoreReader:
    """Read-only view of a data directory; works while a bridge writes to it.

    By default it sees what was synced when it opened. With `secondary` (a scratch directory)
    `refresh()` brings it level with the writer, for a reader that lives as long as the bridge.
    A device is read from the partition placement gives it: a copy elsewhere is the leftover of
    an interrupted move and is never read, so every message reads exactly once.
    """

    def __init__(self, data_dir: Path, secondary: Path | None = None) -> None:
        self.data_dir = data_dir
        self.gaps = GapLog(data_dir)
        self._secondary = secondary
        self.partitions: dict[str, Partition] = {}
        if secondary is not None:
            secondary.mkdir(parents=True, exist_ok=True)
        self.manifest = _NO_LAYOUT
        self._place = Placement([])
        self._follow_layout()

    def _follow_layout(self) -> None:
        # A move switches the manifest before it deletes the old copies: reading the manifest
        # after the partitions' state, and again until it holds still, never pairs an old layout
        # with data whose old copies are already gone.
        for _ in range(10):
            manifest = load_manifest(self.data_dir)
            if manifest == self.manifest:
                return
            self._open(manifest)
        raise StorageUnavailable(f"{self.data_dir}: the partition layout keeps changing")

    def _open(self, manifest: Manifest) -> None:
        self.close()
        try:
            for spec in manifest.partitions:
                path = spec.directory(self.data_dir)
                self.partitions[spec.name] = Partition.open_reader(spec.name, path, self._secondary)
        except BaseException:
            self.close()
            raise
        # Only a complete open counts: a failed one is retried at the next refresh.
        self.manifest = manifest
        self._place = Placement(manifest.weighted)
        for part in self.partitions.values():
            part.catch_up()

    def refresh(self, device_id: str | None = None) -> None:
        """Catch up with the writer (secondary readers), following partition changes.

        With `device_id`, only the partition that holds it: a restore reads one device, and
        each partition's catch-up reads its MANIFEST and WAL tail (milliseconds each). A changed
        layout still reopens, and catches up, every partition.
        """
        if device_id is None:
            parts = list(self.partitions.values())
        else:
            home = self.partitions.get(self.home(device_key(device_id)))
            parts = [home] if home is not None else list(self.partitions.values())
        for part in parts:
            part.catch_up()
        self._follow_layout()

    def __enter__(self) -> StoreReader:
        """Use as a context manager to close the partitions."""
        return self

    def __exit__(self, *_: object) -> None:
        """Close on leaving the block."""
        self.close()

    def home(self, dev_key: bytes) -> str:
        """The partition placement gives this device key."""
        return self._place(dev_key)

    def devices(self) -> list[DeviceInfo]:
        """Every device with its index entry, sorted by device id."""
        found = [
            DeviceInfo(e.device_id, e.first_ns, e.last_ns, e.count, e.size, e.dups, name)
            for name, part in self.partitions.items()
            for dev_key, e in part.index_entries()
            if self.home(dev_key) == name
        ]
        return sorted(found, key=lambda d: d.device)

    def device(self, device_id: str) -> DeviceInfo | None:
        """One device's index entry."""
        dev_key = device_key(device_id)
        name = self.home(dev_key)
        e = self.partitions[name].index_entry(dev_key)
        if e is None:
            return None
        return DeviceInfo(e.device_id, e.first_ns, e.last_ns, e.count, e.size, e.dups, name)

    def messages(
        self,
        device_id: str,
        since_ns: int | None = None,
        until_ns: int | None = None,
        topic_filter: str | None = None,
        reverse: bool = False,
    ) -> Iterator[StoredMessage]:
        """One device's messages in key (= receive time) order, filtered by window and topic."""
        dev_key = device_key(device_id)
        part = self.partitions[self.home(dev_key)]
        for key, value in part.scan(dev_key, since_ns, until_ns, reverse):
            ts_ns, record = decode_record(value)
            if topic_filter is None or filter_matches(topic_filter, record.topic):
                yield StoredMessage(device_id, ts_ns, split_key(key)[2], record)

    def close(self) -> None:
        """Close every partition."""
        for part in self.partitions.values():
            part.close()
        self.partitions.clear()
        self.manifest = _NO_LAYOUT


class LiveReader:
    """Reads through the writer's own handles, in the writer's process: no catch-up needed.

    It sees every acknowledged message, as it reads the database the synced writes went to.
    Each chunk holds the store's read lease (storage/lease.py) and looks the device's partition
    up again, so a move, a failed write that closed the handles, or the shutdown happen between
    two chunks, never under one. While a storage failure keeps the writer's handles closed (a
    full disk), a read-only handle opened for the moment serves instead: nothing is written then,
    so it sees everything stored; it goes as soon as the writer's handles are back.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.data_dir = store.data_dir
        self._fallback: dict[str, tuple[int, Partition]] = {}
        self._falling_back = threading.Lock()
        self._closed = False
        store.drop_read_only.append(self._close_fallback)

    def read(self, cursor: Cursor, limit: int) -> list[StoredMessage]:
        """The next chunk of a device's messages; StorageError when its partition cannot be read.

        StorageError too once the reader or the store is closed: a chunk queued in a worker
        thread may run after the shutdown, and must not open a handle nobody closes.
        """
        return _messages(cursor.device, self.read_rows(cursor, limit))

    def read_rows(self, cursor: Cursor, limit: int) -> list[tuple[bytes, bytes]]:
        """`read`'s chunk undecoded: (key, stored bytes), for `records.decode_fields`.

        What a restore reads (in a worker thread): decoding is left to the caller, which builds
        each answer straight from the stored fields, with no `StoredMessage` per message.
        """
        store = self.store
        with store.lease.shared():
            if self._closed or store.closed:
                raise StorageError(f"{self.data_dir} is closed (the bridge is stopping)")
            name = store.home(device_key(cursor.device))
            part = store.partitions.get(name)
            if part is not None:
                if self._fallback:
                    self._close_fallback()
                return _read_rows(part, cursor, limit)
            with self._falling_back:
                return _read_rows(self._read_only(name), cursor, limit)

    def _read_only(self, name: str) -> Partition:
        # Under the shared lease: the writer cannot reopen (and write) while this is in use.
        opened, part = self._fallback.get(name, (-1, None))
        if part is not None and opened == self.store.opened:
            return part
        if part is not None:
            part.close()  # the writer opened and wrote since: this one is stale
        spec = next(s for s in self.store.manifest.partitions if s.name == name)
        log.info("partition %s is not open for writing (storage fails): reading it read-only", name)
        part = Partition.open_reader(name, spec.directory(self.data_dir))
        self._fallback[name] = (self.store.opened, part)
        return part

    def _close_fallback(self) -> None:
        with self._falling_back:
            for _, part in self._fallback.values():
                part.close()
            self._fallback.clear()

    def close(self) -> None:
        """Close the read-only handles of a storage failure (the writer's are not ours).

        Under the exclusive lease: no chunk is under way, and none after it opens another.
        """
        with self.store.lease.exclusive():
            self._closed = True
            self._close_fallback()
            if self._close_fallback in self.store.drop_read_only:
                self.store.drop_read_only.remove(self._close_fallback)
