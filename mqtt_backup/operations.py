"""Operations that change a data directory or need a consistent copy of it.

snapshot, prune and forget run where the writer is: offline the CLI opens the store itself; with a
bridge running, the CLI sends them over the control socket and the bridge runs them on its ingest
thread between two commits (so no write interleaves, and a snapshot is consistent across
partitions). Results are JSON-ready dicts: they cross that socket.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mqtt_backup.errors import StorageError, UsageError
from mqtt_backup.placement import Weighted, place
from mqtt_backup.storage import Store
from mqtt_backup.storage.files import fsync_dir
from mqtt_backup.storage.journal import GAPS, STATE
from mqtt_backup.storage.manifest import Manifest, PartitionSpec, save_manifest
from mqtt_backup.storage.partition import Removal
from mqtt_backup.times import format_ts

_T = TypeVar("_T")


def snapshot(store: Store, dest: Path) -> dict[str, Any]:
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
        store.on_progress()
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
    return {"snapshot": str(dest), "partitions": [s.name for s in specs]}


def _removal_json(device: str, removal: Removal) -> dict[str, Any]:
    return {"device": device, "messages": removal.count, "bytes": removal.size}


def prune(
    store: Store,
    older_than_ns: int | None = None,
    max_bytes_per_device: int | None = None,
    dry_run: bool = False,
    now_ns: int | None = None,
) -> dict[str, Any]:
    """Delete per device what is older than the cut-off or beyond the newest N bytes.

    Each device is one range delete (plus its index update); devices come from the index, so
    nothing scans the whole store.
    """
    if older_than_ns is None and max_bytes_per_device is None:
        raise UsageError("prune needs --older-than or --max-bytes-per-device")
    cutoff = None if older_than_ns is None else (now_ns or time.time_ns()) - older_than_ns
    total, devices = Removal(), []
    for part in store.partitions.values():
        deleted = []
        for dev_key, entry in list(part.index_entries()):
            # The index knows each device's size: one within its budget is not even read.
            budget = max_bytes_per_device
            if budget is not None and entry.size <= budget:
                budget = None
            if cutoff is not None and entry.first_ns >= cutoff and budget is None:
                continue
            until = _cut(part.keep_newest_start, dev_key, cutoff, budget)
            if until is None:
                continue
            removal = (
                part.measure(dev_key, until)
                if dry_run
                else part.delete_device_range(dev_key, until)
            )
            if removal.count:
                total.merge(removal)
                devices.append(_removal_json(entry.device_id, removal))
                deleted.append(dev_key)
            store.on_progress()
        if store.freeing_space:  # otherwise RocksDB's compactions give the space back in time
            part.reclaim(deleted)
    return {
        "dry_run": dry_run,
        "cutoff": format_ts(cutoff) if cutoff is not None else None,
        "messages": total.count,
        "bytes": total.size,
        "devices": sorted(devices, key=lambda d: d["device"]),
    }


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
) -> dict[str, Any]:
    """Delete one device's history, or its part received before `before_ns`.

    Every partition is cleared, not only the device's home: a stale copy left by an interrupted
    move must not bring forgotten data back when the move is finished. The space is reclaimed
    at once where the disk has room (the device's range is compacted): forgotten data should
    leave the disk too.
    """
    partition, dev_key = store.locate(device)
    removal = store.partitions[partition].measure(dev_key, before_ns)
    if not dry_run:
        for part in store.partitions.values():
            gone = part.delete_device_range(dev_key, before_ns)
            part.reclaim([dev_key])  # also when a first run deleted it and could not reclaim
            if part.name == partition:
                removal = gone
    return {
        "dry_run": dry_run,
        "before": format_ts(before_ns) if before_ns is not None else None,
        **_removal_json(device, removal),
    }


# ---- partition moves ----------------------------------------------------------------------------
#
# A move is crash-safe by its order: copy the device to its new partition (synced), switch the
# manifest atomically, then delete the old copy. Reads follow placement, so before the switch the
# old copy is read and after it the new one: at any crash every message reads exactly once, and
# running the same command again finishes the job (copies are idempotent).

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(slots=True)
class _Move:
    device: str
    dev_key: bytes
    source: str
    target: str
    messages: int
    size: int


def _moves(store: Store, weighted: list[Weighted], only_homes: bool) -> list[_Move]:
    """Devices whose placement under `weighted` differs from the partition holding them."""
    current = store.manifest.weighted
    moves = []
    for name, part in store.partitions.items():
        for dev_key, entry in part.index_entries():
            if only_homes and place(dev_key, current) != name:
                continue  # a leftover copy: rebalance deals with it
            target = place(dev_key, weighted)
            if target != name:
                moves.append(_Move(entry.device_id, dev_key, name, target, entry.count, entry.size))
    return moves


def _moves_json(moves: list[_Move], dry_run: bool) -> dict[str, Any]:
    return {
        "dry_run": dry_run,
        "devices": len(moves),
        "messages": sum(m.messages for m in moves),
        "bytes": sum(m.size for m in moves),
        "moves": [
            {
                "device": m.device,
                "from": m.source,
                "to": m.target,
                "messages": m.messages,
                "bytes": m.size,
            }
            for m in sorted(moves, key=lambda m: m.device)
        ],
    }


def _copy(store: Store, moves: list[_Move]) -> None:
    for move in moves:
        store.partitions[move.target].copy_device_from(store.partitions[move.source], move.dev_key)
        store.on_progress()


def _drop(store: Store, moves: list[_Move]) -> None:
    for move in moves:
        store.partitions[move.source].delete_device_range(move.dev_key)
        store.on_progress()


def partitions_add(
    store: Store, name: str, path: str | None = None, weight: float = 1.0, dry_run: bool = False
) -> dict[str, Any]:
    """Add a partition; only the devices it wins by rendezvous hashing move onto it."""
    if not _NAME.match(name):
        raise UsageError(f"partition name {name!r} must be 1-64 letters, digits, '-' or '_'")
    if not 0 < weight < math.inf:
        raise UsageError(f"weight must be a positive number, got {weight}")
    existing = {s.name: s for s in store.manifest.partitions}
    if name in existing:
        # Already switched (an earlier run crashed before deleting old copies): finish it.
        return {"added": name, **rebalance(store, dry_run)}
    spec = PartitionSpec(name, path or f"partitions/{name}", weight)
    weighted = [*store.manifest.weighted, Weighted(name, weight)]
    if dry_run:
        return {"added": name, **_moves_json(_moves(store, weighted, only_homes=True), True)}
    store.open_new_partition(spec)
    try:
        moves = [m for m in _moves(store, weighted, only_homes=True) if m.source != name]
        _copy(store, moves)
    except BaseException:
        store.partitions.pop(name).close()  # a retry must be able to open it again
        raise
    store.switch(dataclasses.replace(store.manifest, partitions=(*store.manifest.partitions, spec)))
    _drop(store, moves)
    return {"added": name, **_moves_json(moves, dry_run=False)}


def partitions_remove(store: Store, name: str, dry_run: bool = False) -> dict[str, Any]:
    """Remove a partition: only its devices move, each to its next-best partition."""
    specs = store.manifest.partitions
    if name not in {s.name for s in specs}:
        if name in {s.name for s in store.manifest.retired}:
            store.bury_retired()
            return {"removed": name, **_moves_json([], dry_run=False)}
        raise UsageError(f"no partition {name!r}", "mqtt-backup partitions list")
    if len(specs) == 1:
        raise UsageError("cannot remove the last partition")
    keep = tuple(s for s in specs if s.name != name)
    weighted = [Weighted(s.name, s.weight) for s in keep]
    moves = [m for m in _moves(store, weighted, only_homes=True) if m.source == name]
    if dry_run:
        return {"removed": name, **_moves_json(moves, dry_run=True)}
    _copy(store, moves)
    gone = next(s for s in specs if s.name == name)
    store.switch(dataclasses.replace(store.manifest, partitions=keep, retired=(gone,)))
    store.bury_retired()
    return {"removed": name, **_moves_json(moves, dry_run=False)}


def rebalance(store: Store, dry_run: bool = False) -> dict[str, Any]:
    """Put every device where placement says, finishing interrupted moves; or just say what."""
    moves = _moves(store, store.manifest.weighted, only_homes=False)
    if not dry_run:
        home_copies = [m for m in moves if _holds(store, m)]
        _drop(store, home_copies)  # the target already has the device: old copies go
        real = [m for m in moves if m not in home_copies]
        _copy(store, real)
        _drop(store, real)
    return _moves_json(moves, dry_run)


def _holds(store: Store, move: _Move) -> bool:
    return store.partitions[move.target].index_entry(move.dev_key) is not None


def frees_space(op: str, args: Mapping[str, Any]) -> bool:
    """Whether the operation deletes: prune or forget, without --dry-run.

    Only those may spend the ballast on a full disk; a dry run or a snapshot would use up the
    reserve and free nothing.
    """
    return op in ("prune", "forget") and not args.get("dry_run")


def run(store: Store, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Run an operation by name (what the control socket receives); UsageError for bad ones.

    Afterwards compactions are on again and the ballast is made again if the operation gave the
    disk room for it.
    """
    try:
        return _dispatch(store, op, args)
    finally:
        store.done_freeing()


def _dispatch(store: Store, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
    match op:
        case "snapshot":
            return snapshot(store, Path(_arg(args, "dest", str)))
        case "prune":
            return prune(
                store,
                _opt(args, "older_than_ns", int),
                _opt(args, "max_bytes_per_device", int),
                bool(args.get("dry_run", False)),
            )
        case "forget":
            return forget(
                store,
                _arg(args, "device", str),
                _opt(args, "before_ns", int),
                bool(args.get("dry_run", False)),
            )
        case "partitions-add":
            return partitions_add(
                store,
                _arg(args, "name", str),
                _opt(args, "path", str),
                float(args.get("weight", 1.0)),
                bool(args.get("dry_run", False)),
            )
        case "partitions-remove":
            return partitions_remove(
                store, _arg(args, "name", str), bool(args.get("dry_run", False))
            )
        case "rebalance":
            return rebalance(store, bool(args.get("dry_run", False)))
        case _:
            raise UsageError(f"unknown operation {op!r}")


def _arg(args: Mapping[str, Any], name: str, kind: type[_T]) -> _T:
    value = args.get(name)
    if not isinstance(value, kind):
        raise UsageError(f"operation argument {name!r} must be {kind.__name__}")
    return value


def _opt(args: Mapping[str, Any], name: str, kind: type[_T]) -> _T | None:
    return None if args.get(name) is None else _arg(args, name, kind)
