"""Partition moves, run by the writer: add, remove, rebalance.

A move is crash-safe by its order: copy the device to its new partition (synced), switch the
manifest atomically, then delete the old copy. Reads follow placement, so before the switch the
old copy is read and after it the new one: at any crash every message reads exactly once, and
running the same command again finishes the job (copies are idempotent).

Each returns a typed result whose `as_json()` is the document `--json` prints and the control
socket carries (its keys never change: users' scripts read them).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from mqtt_backup.errors import UsageError
from mqtt_backup.placement import Weighted, place
from mqtt_backup.storage.manifest import PartitionSpec
from mqtt_backup.storage.store import Store

__all__ = ["Move", "Moves", "PartitionAdded", "PartitionRemoved", "add", "rebalance", "remove"]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Move:
    """One device leaving `source` for `target`, with its messages and stored bytes."""

    device: str
    dev_key: bytes
    source: str
    target: str
    messages: int
    size: int

    def as_json(self) -> dict[str, Any]:
        """`{"device", "from", "to", "messages", "bytes"}`."""
        return {
            "device": self.device,
            "from": self.source,
            "to": self.target,
            "messages": self.messages,
            "bytes": self.size,
        }


@dataclass(frozen=True, slots=True)
class Moves:
    """The devices a change moved (or, as a dry run, would move), sorted by device id."""

    dry_run: bool
    moves: tuple[Move, ...]

    @classmethod
    def of(cls, moves: list[Move], dry_run: bool) -> Moves:
        """The moves in device order."""
        return cls(dry_run, tuple(sorted(moves, key=lambda m: m.device)))

    @property
    def devices(self) -> int:
        """Devices moved."""
        return len(self.moves)

    @property
    def messages(self) -> int:
        """Messages moved."""
        return sum(m.messages for m in self.moves)

    @property
    def size(self) -> int:
        """Stored bytes moved."""
        return sum(m.size for m in self.moves)

    def as_json(self) -> dict[str, Any]:
        """`partitions rebalance --json`: dry_run, devices, messages, bytes, moves."""
        return {
            "dry_run": self.dry_run,
            "devices": self.devices,
            "messages": self.messages,
            "bytes": self.size,
            "moves": [m.as_json() for m in self.moves],
        }


@dataclass(frozen=True, slots=True)
class PartitionAdded:
    """A partition added, and the devices that moved onto it."""

    name: str
    moves: Moves

    def as_json(self) -> dict[str, Any]:
        """`partitions add --json`: `{"added": name, ...the moves}`."""
        return {"added": self.name, **self.moves.as_json()}


@dataclass(frozen=True, slots=True)
class PartitionRemoved:
    """A partition removed, and the devices that moved off it."""

    name: str
    moves: Moves

    def as_json(self) -> dict[str, Any]:
        """`partitions remove --json`: `{"removed": name, ...the moves}`."""
        return {"removed": self.name, **self.moves.as_json()}


def add(
    store: Store, name: str, path: str | None = None, weight: float = 1.0, dry_run: bool = False
) -> PartitionAdded:
    """Add a partition; only the devices it wins by rendezvous hashing move onto it."""
    if not _NAME.match(name):
        raise UsageError(f"partition name {name!r} must be 1-64 letters, digits, '-' or '_'")
    if not 0 < weight < math.inf:
        raise UsageError(f"weight must be a positive number, got {weight}")
    existing = {s.name: s for s in store.manifest.partitions}
    if name in existing:
        # Already switched (an earlier run crashed before deleting old copies): finish it.
        return PartitionAdded(name, rebalance(store, dry_run))
    spec = PartitionSpec(name, path or f"partitions/{name}", weight)
    weighted = [*store.manifest.weighted, Weighted(name, weight)]
    if dry_run:
        return PartitionAdded(name, Moves.of(_moves(store, weighted, only_homes=True), True))
    store.open_new_partition(spec)
    try:
        moves = [m for m in _moves(store, weighted, only_homes=True) if m.source != name]
        _copy(store, moves)
    except BaseException:
        store.drop_partition(name)  # a retry must be able to open it again
        raise
    store.switch(dataclasses.replace(store.manifest, partitions=(*store.manifest.partitions, spec)))
    _drop(store, moves)
    return PartitionAdded(name, Moves.of(moves, dry_run=False))


def remove(store: Store, name: str, dry_run: bool = False) -> PartitionRemoved:
    """Remove a partition: only its devices move, each to its next-best partition."""
    specs = store.manifest.partitions
    if name not in {s.name for s in specs}:
        if name in {s.name for s in store.manifest.retired}:
            store.bury_retired()
            return PartitionRemoved(name, Moves.of([], dry_run=False))
        raise UsageError(f"no partition {name!r}", "mqtt-backup partitions list")
    if len(specs) == 1:
        raise UsageError("cannot remove the last partition")
    keep = tuple(s for s in specs if s.name != name)
    weighted = [Weighted(s.name, s.weight) for s in keep]
    moves = [m for m in _moves(store, weighted, only_homes=True) if m.source == name]
    if dry_run:
        return PartitionRemoved(name, Moves.of(moves, dry_run=True))
    _copy(store, moves)
    gone = next(s for s in specs if s.name == name)
    store.switch(dataclasses.replace(store.manifest, partitions=keep, retired=(gone,)))
    store.bury_retired()
    return PartitionRemoved(name, Moves.of(moves, dry_run=False))


def rebalance(store: Store, dry_run: bool = False) -> Moves:
    """Put every device where placement says, finishing interrupted moves; or just say what."""
    moves = _moves(store, store.manifest.weighted, only_homes=False)
    if not dry_run:
        home_copies = [m for m in moves if _holds(store, m)]
        _drop(store, home_copies)  # the target already has the device: old copies go
        real = [m for m in moves if m not in home_copies]
        _copy(store, real)
        _drop(store, real)
    return Moves.of(moves, dry_run)


def _moves(store: Store, weighted: list[Weighted], only_homes: bool) -> list[Move]:
    """Devices whose placement under `weighted` differs from the partition holding them."""
    current = store.manifest.weighted
    moves = []
    for name, part in store.partitions.items():
        for dev_key, entry in part.index_entries():
            if only_homes and place(dev_key, current) != name:
                continue  # a leftover copy: rebalance deals with it
            target = place(dev_key, weighted)
            if target != name:
                moves.append(Move(entry.device_id, dev_key, name, target, entry.count, entry.size))
    return moves


def _copy(store: Store, moves: list[Move]) -> None:
    for move in moves:
        store.partitions[move.target].copy_device_from(store.partitions[move.source], move.dev_key)
        store.on_progress()


def _drop(store: Store, moves: list[Move]) -> None:
    for move in moves:
        store.partitions[move.source].delete_device_range(move.dev_key)
        store.on_progress()


def _holds(store: Store, move: Move) -> bool:
    return store.partitions[move.target].index_entry(move.dev_key) is not None
