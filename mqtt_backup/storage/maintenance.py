"""Maintenance run by the writer of a data directory: snapshot, prune, forget.

Each takes the open `Store` and returns a typed result; its `as_json()` is the document that
`--json` prints and the control socket carries (shared/DESIGN.md, the README: users' scripts read
it, so its keys never change). Partition moves are in `storage.moves`, the read-only checks in
`storage.checks`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqtt_backup.errors import StorageError, UsageError
from mqtt_backup.keys import split_key
from mqtt_backup.storage.files import fsync_dir
from mqtt_backup.storage.journal import GAPS, STATE
from mqtt_backup.storage.manifest import Manifest, PartitionSpec, save_manifest
from mqtt_backup.storage.partition import Partition, Removal
from mqtt_backup.storage.store import Store
from mqtt_backup.storage.units import Budget, Units, to_the_end
from mqtt_backup.times import format_ts

__all__ = [
    "Forgotten",
    "Pruned",
    "Removed",
    "Snapshot",
    "forget",
    "forgetting",
    "prune",
    "pruning",
    "snapshot",
]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot written: where, and the partitions it holds."""

    path: Path
    partitions: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        """`snapshot --json`: `{"snapshot": path, "partitions": [names]}`."""
        return {"snapshot": str(self.path), "partitions": list(self.partitions)}


@dataclass(frozen=True, slots=True)
class Removed:
    """What a delete took (or a dry run would take) from one device; `size` is stored bytes."""

    device: str
    messages: int
    size: int

    def as_json(self) -> dict[str, Any]:
        """`{"device", "messages", "bytes"}`."""
        return {"device": self.device, "messages": self.messages, "bytes": self.size}


@dataclass(frozen=True, slots=True)
class Pruned:
    """A prune: its cut-off (None for a size budget only) and each device it deleted from."""

    dry_run: bool
    cutoff_ns: int | None
    devices: tuple[Removed, ...]  # sorted by device id

    @property
    def messages(self) -> int:
        """Messages deleted over every device."""
        return sum(d.messages for d in self.devices)

    @property
    def size(self) -> int:
        """Stored bytes deleted over every device."""
        return sum(d.size for d in self.devices)

    def as_json(self) -> dict[str, Any]:
        """`prune --json`: dry_run, cutoff (RFC 3339 or null), messages, bytes, devices."""
        return {
            "dry_run": self.dry_run,
            "cutoff": format_ts(self.cutoff_ns) if self.cutoff_ns is not None else None,
            "messages": self.messages,
            "bytes": self.size,
            "devices": [d.as_json() for d in self.devices],
        }


@dataclass(frozen=True, slots=True)
class Forgotten:
    """A forget: what went of the device, received before `before_ns` (all when None)."""

    dry_run: bool
    before_ns: int | None
    removed: Removed

    def as_json(self) -> dict[str, Any]:
        """`forget --json`: dry_run, before (RFC 3339 or null), device, messages, bytes."""
        return {
            "dry_run": self.dry_run,
            "before": format_ts(self.before_ns) if self.before_ns is not None else None,
            **self.removed.as_json(),
        }


def snapshot(store: Store, dest: Path) -> Snapshot:
    """A consistent hot copy of every partition (RocksDB checkpoints), the manifest and the logs.

    The copy opens as a normal data directory. It keeps the bridge's client id: run a bridge on
    it beside the original only with its own --client-id.
    """
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest} exists and is not an empty directory", "choose a new DEST")
    try:
        (dest / "partitions").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {dest}: {exc.strerror or exc}", "choose DEST") from exc
    specs = []
    for spec in store.manifest.partitions:
        relative = f"partitions/{spec.name}"
        store.partitions[spec.name].checkpoint(dest / relative)
        specs.append(PartitionSpec(spec.name, relative, spec.weight))
    for name in (GAPS, STATE):
        if (store.data_dir / name).exists():
            try:
                shutil.copy2(store.data_dir / name, dest / name)
            except OSError as exc:
                raise StorageError(f"cannot copy {name} to {dest}: {exc.strerror}") from exc
    manifest = Manifest(store.manifest.format, store.manifest.client_id, tuple(specs))
    save_manifest(dest, manifest)  # last: a copy without its manifest is visibly unfinished
    fsync_dir(dest)
    return Snapshot(dest, tuple(s.name for s in specs))


def _removed(device: str, removal: Removal) -> Removed:
    return Removed(device, removal.count, removal.size)


def prune(
    store: Store,
    older_than_ns: int | None = None,
    max_bytes_per_device: int | None = None,
    dry_run: bool = False,
    now_ns: int | None = None,
) -> Pruned:
    """Delete per device what is older than the cut-off or beyond the newest N bytes.

    Each device is one range delete (plus its index update); devices come from the index, so
    nothing scans the whole store. On a full disk (`store.freeing_space`) each partition's
    deleted ranges are reclaimed at once; otherwise RocksDB's compactions give the space back
    in time (an hourly retention pass must not rewrite files every hour).
    """
    return to_the_end(pruning(store, older_than_ns, max_bytes_per_device, dry_run, now_ns))


def pruning(
    store: Store,
    older_than_ns: int | None = None,
    max_bytes_per_device: int | None = None,
    dry_run: bool = False,
    now_ns: int | None = None,
) -> Units[Pruned]:
    """`prune` in units: a partition's index read, then its devices, a unit's worth at a time.

    A device's cut, its range delete and its index update are one unit's: a commit between
    units finds the entry as the delete left it (the listing read before may be older: it only
    chooses which devices to look at, the cut is made from what is there).
    """
    if older_than_ns is None and max_bytes_per_device is None:
        raise UsageError("prune needs --older-than or --max-bytes-per-device")
    cutoff = None if older_than_ns is None else (now_ns or time.time_ns()) - older_than_ns
    devices = []
    budget = Budget()
    for name in list(store.partitions):
        deleted = []
        for dev_key, entry in list(store.partitions[name].index_entries()):
            # The index knows each device's size: one within its budget is not even read.
            budget_bytes = max_bytes_per_device
            if budget_bytes is not None and entry.size <= budget_bytes:
                budget_bytes = None
            if cutoff is not None and entry.first_ns >= cutoff and budget_bytes is None:
                continue
            part = store.partitions[name]
            until = _cut(part.keep_newest_start, dev_key, cutoff, budget_bytes)
            if until is None:
                continue
            removal = (
                part.measure(dev_key, until)
                if dry_run
                else part.delete_device_range(dev_key, until)
            )
            if removal.count:
                devices.append(_removed(entry.device_id, removal))
                deleted.append(dev_key)
            if budget.spend(removal.count):
                yield
        if store.freeing_space:
            store.partitions[name].reclaim(deleted)
        yield
    return Pruned(dry_run, cutoff, tuple(sorted(devices, key=lambda d: d.device)))


def _cut(
    keep_newest_start: Callable[[bytes, int], int | None],
    dev_key: bytes,
    cutoff: int | None,
    budget: int | None,
) -> int | None:
    by_size = keep_newest_start(dev_key, budget) if budget is not None else None
    cuts = [c for c in (cutoff, by_size) if c is not None]
    return max(cuts) if cuts else None


def forget(
    store: Store, device: str, before_ns: int | None = None, dry_run: bool = False
) -> Forgotten:
    """Delete one device's history, or its part received before `before_ns`.

    Every partition is cleared, not only the device's home: a stale copy left by an interrupted
    move must not bring forgotten data back when the move is finished. The space is reclaimed
    at once where the disk has room (the device's range is compacted): forgotten data should
    leave the disk too.
    """
    return to_the_end(forgetting(store, device, before_ns, dry_run))


def forgetting(
    store: Store, device: str, before_ns: int | None = None, dry_run: bool = False
) -> Units[Forgotten]:
    """`forget` in units: one partition each (its range delete, index update and reclaim).

    Each partition is cut at what it held when the forget began: a message stored between two
    units came after the command, was acknowledged, and stays (keys only grow in a partition).
    """
    partition, dev_key = store.locate(device)
    removal = store.partitions[partition].measure(dev_key, before_ns)
    if not dry_run:
        cuts = {
            name: _held_at_start(part, dev_key, before_ns)
            for name, part in store.partitions.items()
        }
        for name, cut in cuts.items():
            yield
            part = store.partitions[name]
            gone = part.delete_device_range(dev_key, cut)
            part.reclaim([dev_key])  # also when a first run deleted it and could not reclaim
            if name == partition:
                removal = gone
    return Forgotten(dry_run, before_ns, _removed(device, removal))


def _held_at_start(part: Partition, dev_key: bytes, before_ns: int | None) -> int:
    """The cut (exclusive) taking what the partition holds of the device now (before `before_ns`).

    Past the partition's clock, which every later write of it exceeds; past the device's last
    key there too (a merge cut short by a crash may leave keys beyond the clock).
    """
    last = part.last_key(dev_key)
    cut = max(part.clock_ns, split_key(last)[1] if last is not None else 0) + 1
    return cut if before_ns is None else min(before_ns, cut)
