"""Operations in units attacked: writes between every two units, nothing acknowledged is lost.

Real RocksDB in temp dirs, with the helpers of tests/test_units.py (writes placed as ingest
places them, units made small).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from mqtt_backup.errors import StorageUnavailable
from mqtt_backup.keys import device_key
from mqtt_backup.placement import Weighted, place
from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store, StoreReader, checks, moves, units
from mqtt_backup.storage import maintenance as maint
from mqtt_backup.storage.partition import Partition
from mqtt_backup.storage.units import step
from tests.test_units import (
    _away_from_home,
    assert_placed_once,
    fleet,
    small_units,
    store,
)
from tests.unit_fleet import BASE_NS, Fleet, drive

__all__ = ["fleet", "small_units", "store"]  # the fixtures, used by name


def test_forget_keeps_every_message_stored_after_it_began(store: Store, fleet: Fleet) -> None:
    """What arrives between the forget's units came after the command: it stays.

    Its home is cleared last, so a message stored between the first units was deleted by the
    home's unit (acknowledged, then gone).
    """
    last = list(store.partitions)[-1]
    device = next(d for d in fleet.sent if store.locate(d)[0] == last)
    before = len(fleet.sent[device])

    def between(_n: int) -> None:
        fleet.publish([device])

    result, _ = drive(maint.forgetting(store, device), between)
    assert isinstance(result, maint.Forgotten)
    assert result.removed.messages == before
    with StoreReader(store.data_dir) as reader:
        kept = [m.record.payload for m in reader.messages(device)]
        info = reader.device(device)
    assert kept == fleet.sent[device][before:], "everything stored after the forget began"
    assert info is not None
    assert info.count == len(kept)


def test_a_remove_after_one_cut_short_after_its_switch_buries_both(
    store: Store, fleet: Fleet
) -> None:
    """A remove stopped between its switch and its burial (a commit failed between the units,
    a stop), then another remove: the first partition's files went with nobody to delete them."""
    work = moves.removing(store, "p1")
    while not store.manifest.retired:
        assert step(work) is None
    work.close()  # as the bridge does when a commit between units fails
    assert [s.name for s in store.manifest.retired] == ["p1"]
    moves.remove(store, "p2")
    partitions = store.data_dir / "partitions"
    assert sorted(p.name for p in partitions.iterdir()) == ["p0"]
    assert store.manifest.retired == ()
    assert_placed_once(store, fleet.sent)


def test_a_merge_whose_count_failed_is_counted_by_the_rebalance_run_again(
    store: Store, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge's records are home, its index write fails (a full disk; a kill -9 between
    the two writes does the same): a re-run found home holding the copy's newest key, took the
    entry for a finished copy and deleted the copy away: the index kept not counting the
    merged history (`verify` failed for good, `devices` said 1 message of 13)."""
    device = "stray"
    _away_from_home(store, fleet, device)
    fleet.publish([device])  # home has an entry now, with one message
    real = Partition.reindex

    def full_disk(_part: Partition, _dev_key: bytes, _device: str) -> None:
        raise StorageUnavailable("write failed: IO error: No space left on device (injected)")

    monkeypatch.setattr(Partition, "reindex", full_disk)
    with pytest.raises(StorageUnavailable):
        moves.rebalance(store)
    monkeypatch.setattr(Partition, "reindex", real)
    moves.rebalance(store)
    with StoreReader(store.data_dir) as reader:
        got = [m.record.payload for m in reader.messages(device)]
    assert sorted(got) == sorted(fleet.sent[device])
    fleet.sent[device] = got
    assert_placed_once(store, fleet.sent)


def test_a_move_holds_a_bounded_number_of_bytes_of_large_records(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit is counted in records: a device of large payloads (camera snapshots) was read
    whole into memory, and again into the write (10,000 one-MB records: ~20 GB, an OOM kill,
    and a re-run killed the same way). Each read and write of a copy now ends at a byte bound."""
    monkeypatch.setattr(units, "UNIT_KEYS", 10_000)  # the real unit
    after = [*[Weighted(f"p{i}") for i in range(3)], Weighted("p3")]
    device = next(
        f"cam-{i}" for i in itertools.count() if place(device_key(f"cam-{i}"), after) == "p3"
    )
    big = 1 << 20
    sent = [b"%02d" % n + b"x" * big for n in range(24)]
    partition, dev_key = store.locate(device)
    items = [Pending(device, dev_key, BASE_NS + n, Record("cams/t", p)) for n, p in enumerate(sent)]
    store.write(partition, items)
    held: list[int] = []
    real = Partition.read_range

    def observed(part: Partition, *args: Any, **options: Any) -> list[tuple[bytes, bytes]]:
        rows = real(part, *args, **options)
        held.append(sum(len(value) for _, value in rows))
        return rows

    monkeypatch.setattr(Partition, "read_range", observed)
    result = moves.add(store, "p3")
    monkeypatch.undo()
    assert [m.device for m in result.moves.moves] == [device]
    assert max(held) <= 9 * big + 1024, held  # 8 MiB, and the record that reached it
    with StoreReader(store.data_dir) as reader:
        assert [m.record.payload for m in reader.messages(device)] == sent
    assert checks.verify(store.data_dir).ok


def test_an_add_again_after_a_remove_cut_short_after_its_switch(store: Store, fleet: Fleet) -> None:
    """`partitions add p3`, `remove p3` stopped between its switch and its burial, `add p3`:
    refused with 'partitions p3 and p3 overlap' (the retired p3 still listed, its files there)."""
    moves.add(store, "p3")
    work = moves.removing(store, "p3")
    while not store.manifest.retired:
        assert step(work) is None
    work.close()
    result, _ = drive(moves.adding(store, "p3"), lambda _n: fleet.publish(["dev-001", "dev-002"]))
    assert isinstance(result, moves.PartitionAdded)
    assert result.moves.devices > 0
    assert store.manifest.retired == ()
    assert_placed_once(store, fleet.sent)
