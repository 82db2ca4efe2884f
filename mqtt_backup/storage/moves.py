"""Partition moves, run by the writer: add, remove, rebalance.

A move is crash-safe by its order: copy the device to its new partition (synced), switch the
manifest atomically, then delete the old copy. Reads follow placement, so before the switch the
old copy is read and after it the new one: at any crash every message reads exactly once, and
running the same command again finishes the job (copies are idempotent).

Each runs in units (`storage.units`) that a running bridge's commits may come between. Until the
switch a moving device's new messages go to its old partition, as placement says; the store
notes which devices were written (`Store.watch_writes`), and each of them is copied on from
where its copy stopped (keys only grow in a partition), the last of them in the unit that
switches, so the new partition holds everything the old one did at the switch.

Each returns a typed result whose `as_json()` is the document `--json` prints and the control
socket carries (its keys never change: users' scripts read them).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqtt_backup.errors import UsageError
from mqtt_backup.placement import Weighted, place
from mqtt_backup.storage.manifest import Manifest, PartitionSpec
from mqtt_backup.storage.store import Store
from mqtt_backup.storage.units import Budget, Units, to_the_end

__all__ = [
    "Move",
    "Moves",
    "PartitionAdded",
    "PartitionRemoved",
    "add",
    "adding",
    "readd_error",
    "rebalance",
    "rebalancing",
    "remove",
    "removing",
]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Passes that copy on what was written meanwhile, with commits between their units, before the
# last one that switches with none (each copies what arrived during the one before).
CATCH_UP_PASSES = 3


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
    store: Store,
    name: str,
    path: str | None = None,
    weight: float | None = None,
    dry_run: bool = False,
) -> PartitionAdded:
    """Add a partition; only the devices it wins by rendezvous hashing move onto it."""
    return to_the_end(adding(store, name, path, weight, dry_run))


def adding(
    store: Store,
    name: str,
    path: str | None = None,
    weight: float | None = None,
    dry_run: bool = False,
) -> Units[PartitionAdded]:
    """`add` in units; `path` and `weight` left out mean the default ones (or the ones it has)."""
    if not _NAME.match(name):
        raise UsageError(f"partition name {name!r} must be 1-64 letters, digits, '-' or '_'")
    if weight is not None and not 0 < weight < math.inf:
        raise UsageError(f"weight must be a positive number, got {weight}")
    existing = next((s for s in store.manifest.partitions if s.name == name), None)
    if existing is not None:
        error = readd_error(store.data_dir, existing, path, weight, f"--path {path}")
        if error is not None:
            raise error
        # Already switched (an earlier run crashed before deleting old copies): finish it.
        return PartitionAdded(name, (yield from rebalancing(store, dry_run)))
    spec = PartitionSpec(name, path or f"partitions/{name}", 1.0 if weight is None else weight)
    if not dry_run:
        store.bury_retired()  # a remove stopped after its switch: its files may be where this goes
    after = dataclasses.replace(store.manifest, partitions=(*store.manifest.partitions, spec))
    if dry_run:
        planned = yield from _planned(store, after.weighted)
        return PartitionAdded(name, Moves.of(planned, True))
    store.open_new_partition(spec)
    try:
        moves = yield from _move(store, after)
    except BaseException:
        if name not in {s.name for s in store.manifest.partitions}:
            store.drop_partition(name)  # a retry must be able to open it again
        raise
    yield from _drop(store, moves)
    return PartitionAdded(name, Moves.of(moves, dry_run=False))


def readd_error(
    data_dir: Path, existing: PartitionSpec, path: str | None, weight: float | None, shown: str
) -> UsageError | None:
    """Why an add of `existing`'s name is not a re-run of its add (None: it is one, to finish).

    A re-run that changed nothing would otherwise pass for a move or a new weight; `shown` names
    the asked path as the user typed it.
    """
    at = existing.directory(data_dir).resolve()
    differs = []
    if path is not None and (data_dir / path).resolve() != at:
        differs.append(shown)
    if weight is not None and weight != existing.weight:
        differs.append(f"--weight {weight:g}")
    if not differs:
        return None
    return UsageError(
        f"partition {existing.name} exists already at {at} with weight {existing.weight:g}, "
        f"not {' '.join(differs)}",
        f"leave --path and --weight out to finish an interrupted add; to move it or change its "
        f"weight, mqtt-backup partitions remove {existing.name}, then add it again",
    )


def remove(store: Store, name: str, dry_run: bool = False) -> PartitionRemoved:
    """Remove a partition: only its devices move, each to its next-best partition."""
    return to_the_end(removing(store, name, dry_run))


def removing(store: Store, name: str, dry_run: bool = False) -> Units[PartitionRemoved]:
    """`remove` in units."""
    specs = store.manifest.partitions
    if name not in {s.name for s in specs}:
        if name in {s.name for s in store.manifest.retired}:
            store.bury_retired()
            return PartitionRemoved(name, Moves.of([], dry_run=False))
        raise UsageError(f"no partition {name!r}", "mqtt-backup partitions list")
    if len(specs) == 1:
        raise UsageError("cannot remove the last partition")
    keep = tuple(s for s in specs if s.name != name)
    gone = next(s for s in specs if s.name == name)
    # Retired ones of a remove stopped before its burial stay listed: buried with this one.
    retired = (*store.manifest.retired, gone)
    after = dataclasses.replace(store.manifest, partitions=keep, retired=retired)
    if dry_run:
        planned = yield from _planned(store, after.weighted)
        return PartitionRemoved(name, Moves.of([m for m in planned if m.source == name], True))
    moves = yield from _move(store, after)
    yield  # switched: the partition's files go in a unit of their own
    store.bury_retired()
    return PartitionRemoved(name, Moves.of(moves, dry_run=False))


def rebalance(store: Store, dry_run: bool = False) -> Moves:
    """Put every device where placement says, finishing interrupted moves; or just say what."""
    return to_the_end(rebalancing(store, dry_run))


def rebalancing(store: Store, dry_run: bool = False) -> Units[Moves]:
    """`rebalance` in units.

    The layout does not change here: each device found away from home is merged into its home
    (which already receives its new messages) unless home has the whole copy, then deleted.
    """
    moves = yield from _planned(store, store.manifest.weighted, only_homes=False)
    if dry_run:
        return Moves.of(moves, dry_run)
    budget, dirty = Budget(), set[str]()
    for move in moves:
        if _holds(store, move):
            # Counted again: a merge cut short between its last copy and its count (a kill -9,
            # a full disk) left the newest key home, and the entry not counting the history.
            store.partitions[move.target].reindex(move.dev_key, move.device, changed_only=True)
        else:
            yield from _merge(store, move, budget)
        if _delete_copy(store, move, budget, dirty):
            _sync(store, dirty)
            yield
    _sync(store, dirty)
    return Moves.of(moves, dry_run)


def _planned(store: Store, weighted: list[Weighted], only_homes: bool = True) -> Units[list[Move]]:
    """Devices whose placement under `weighted` differs from the partition holding them.

    `only_homes`: only the copies that placement reads now (a leftover copy is rebalance's).
    One unit per partition's index.
    """
    current = store.manifest.weighted
    moves = []
    for name in list(store.partitions):
        for dev_key, entry in store.partitions[name].index_entries():
            if only_homes and place(dev_key, current) != name:
                continue  # a leftover copy: rebalance deals with it
            target = place(dev_key, weighted)
            if target != name:
                moves.append(Move(entry.device_id, dev_key, name, target, entry.count, entry.size))
        yield
    return moves


def _move(store: Store, after: Manifest) -> Units[list[Move]]:
    """Copy every device that `after` places elsewhere, then switch to `after`.

    Planned with the store watching writes: a device written meanwhile (a new one included) is
    copied on from where it stopped, in passes with commits between their units, and what was
    written during the last pass in the unit that switches.
    """
    current, new = store.manifest.weighted, after.weighted
    store.watch_writes(True)
    try:
        moves = yield from _planned(store, new)
        copied: dict[bytes, bytes | None] = {}
        budget = Budget()
        yield from _copy(store, moves, copied, budget)
        for _ in range(CATCH_UP_PASSES):
            units = yield from _copy(store, _behind(store, moves, current, new), copied, budget)
            if not units:
                break
        # The last unit: no commit comes between this catch-up and the switch.
        to_the_end(_copy(store, _behind(store, moves, current, new), copied, Budget()))
        store.switch(after)
    finally:
        store.watch_writes(False)
    return moves


def _behind(
    store: Store, moves: list[Move], current: list[Weighted], new: list[Weighted]
) -> list[Move]:
    """The moving devices written since the last look; a device not planned joins `moves`."""
    planned = {m.dev_key: m for m in moves}
    behind = []
    for dev_key in sorted(store.written()):  # in key order: the same units in every process
        move = planned.get(dev_key)
        if move is None:
            source, target = place(dev_key, current), place(dev_key, new)
            entry = store.partitions[source].index_entry(dev_key)
            if source == target or entry is None:
                continue
            move = Move(entry.device_id, dev_key, source, target, entry.count, entry.size)
            moves.append(move)
        behind.append(move)
    return behind


def _copy(
    store: Store, moves: list[Move], copied: dict[bytes, bytes | None], budget: Budget
) -> Units[int]:
    """Copy each device on from the last key copied (`copied`); returns the units it yielded.

    A device's first copy deletes a stale one of an earlier, interrupted move first. Its index
    entry is taken from the source whenever its records are all copied. The writes of a unit
    are synced once, at its end (before the switch too).
    """
    units, dirty = 0, set[str]()
    for move in moves:
        dev_key = move.dev_key
        if dev_key not in copied:
            store.partitions[move.target].delete_device_range(dev_key, sync=False)
            copied[dev_key] = None
        while True:
            target, source = store.partitions[move.target], store.partitions[move.source]
            limit = budget.left
            copied[dev_key], count = target.copy_keys_from(
                source, dev_key, copied[dev_key], limit, sync=False
            )
            dirty.add(move.target)
            full = budget.spend(count)
            if count < limit:
                break
            _sync(store, dirty)
            units += 1
            yield
        if full:
            _sync(store, dirty)
            units += 1
            yield
    _sync(store, dirty)
    return units


def _merge(store: Store, move: Move, budget: Budget) -> Units[None]:
    """Copy a device's records into its home, which keeps its own; then count them there.

    The count's synced write makes the copied records durable before the copy away is deleted.
    """
    after: bytes | None = None
    while True:
        target, source = store.partitions[move.target], store.partitions[move.source]
        limit = budget.left
        after, count = target.copy_keys_from(
            source, move.dev_key, after, limit, entry=False, sync=False
        )
        budget.spend(count)
        if count < limit:
            break
        target.sync()
        yield
    store.partitions[move.target].reindex(move.dev_key, move.device)


def _drop(store: Store, moves: list[Move]) -> Units[None]:
    """Delete the copies the moves left behind, a unit's worth at a time (synced at its end)."""
    budget, dirty = Budget(), set[str]()
    for move in moves:
        if _delete_copy(store, move, budget, dirty):
            _sync(store, dirty)
            yield
    _sync(store, dirty)


def _delete_copy(store: Store, move: Move, budget: Budget, dirty: set[str]) -> bool:
    """Delete (unsynced) what a move left at its source; whether that spent the unit's budget."""
    removal = store.partitions[move.source].delete_device_range(move.dev_key, sync=False)
    dirty.add(move.source)
    return budget.spend(removal.count)


def _sync(store: Store, names: set[str]) -> None:
    for name in names:
        store.partitions[name].sync()
    names.clear()


def _holds(store: Store, move: Move) -> bool:
    """Whether home holds the whole copy already: an index entry, and the copy's newest key."""
    target = store.partitions[move.target]
    if target.index_entry(move.dev_key) is None:
        return False
    last = store.partitions[move.source].last_key(move.dev_key)
    return last is None or target.has_key(last)
