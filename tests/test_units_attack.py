"""Operations in units attacked: writes between every two units, nothing acknowledged is lost.

Real RocksDB in temp dirs, with the helpers of tests/test_units.py (writes placed as ingest
places them, units made small).
"""

from __future__ import annotations

from mqtt_backup.storage import Store, StoreReader, moves
from mqtt_backup.storage import maintenance as maint
from mqtt_backup.storage.units import step
from tests.test_units import Fleet, assert_placed_once, drive, fleet, small_units, store

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
