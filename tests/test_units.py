"""Operations in units with writes between them: nothing lost, misplaced, duplicated or miscounted.

Real RocksDB in temp dirs. Between two units the test writes as ingest would (placed by
`Store.locate`, one synced write per partition), the way the asyncio bridge commits what it held.
The unit is made small (`units.UNIT_KEYS`), so that a small store takes many units.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mqtt_backup import operations
from mqtt_backup.keys import device_key
from mqtt_backup.placement import Weighted, place
from mqtt_backup.records import Record
from mqtt_backup.storage import (
    Cursor,
    LiveReader,
    Pending,
    Store,
    StoreReader,
    checks,
    moves,
    units,
)
from mqtt_backup.storage import maintenance as maint
from tests.conftest import REPO
from tests.unit_fleet import BASE_NS, DEVICES, PER_DEVICE, Fleet, drive, write_between


@pytest.fixture(autouse=True)
def small_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(units, "UNIT_KEYS", 5)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "data", partitions=3)
    yield opened
    opened.close()


@pytest.fixture
def fleet(store: Store) -> Fleet:
    fleet = Fleet(store)
    for _ in range(PER_DEVICE):
        fleet.publish(f"dev-{d:03d}" for d in range(DEVICES))
    return fleet


def assert_placed_once(store: Store, sent: dict[str, list[bytes]]) -> None:
    """Every device where placement says, with exactly what it sent, counted right."""
    assert moves.rebalance(store, dry_run=True).devices == 0, "no copy left away from home"
    with StoreReader(store.data_dir) as reader:
        listed = {d.device: d for d in reader.devices()}
        assert sorted(listed) == sorted(sent)
        for device, payloads in sent.items():
            info = listed[device]
            assert info.partition == reader.home(device_key(device)), device
            assert [m.record.payload for m in reader.messages(device)] == payloads, device
            assert info.count == len(payloads), device
    report = checks.verify(store.data_dir)
    assert report.ok, report.as_json()


def _writing_between(fleet: Fleet, new_every: int = 3) -> Callable[[int], None]:
    """Between units: three existing devices write, and every few units a new device appears."""

    def between(n: int) -> None:
        devices = [f"dev-{(n * 7 + k) % DEVICES:03d}" for k in range(3)]
        if n % new_every == 0:
            devices.append(f"new-{n:03d}")
        fleet.publish(devices)

    return between


def test_an_add_in_units_with_writes_between_places_every_message_once(
    store: Store, fleet: Fleet
) -> None:
    between = _writing_between(fleet)
    born_at_home: set[str] = set()  # born after the switch: they start in p3, nothing moves

    def write_and_note(n: int) -> None:
        known = set(fleet.sent)
        between(n)
        if any(s.name == "p3" for s in store.manifest.partitions):
            born_at_home.update(set(fleet.sent) - known)

    result, ran = drive(moves.adding(store, "p3"), write_and_note)
    assert isinstance(result, moves.PartitionAdded)
    assert ran > 20, "the add took many units"
    after = [*[Weighted(f"p{i}") for i in range(3)], Weighted("p3")]
    movers = {d for d in fleet.sent if place(device_key(d), after) == "p3"} - born_at_home
    assert {m.device for m in result.moves.moves} == movers  # the new ones included
    assert any(d.startswith("new-") for d in movers), "a device born during the add moved too"
    assert_placed_once(store, fleet.sent)


def test_a_remove_in_units_with_writes_between_places_every_message_once(
    store: Store, fleet: Fleet
) -> None:
    result, ran = drive(moves.removing(store, "p1"), _writing_between(fleet))
    assert isinstance(result, moves.PartitionRemoved)
    assert ran > 20
    assert [s.name for s in store.manifest.partitions] == ["p0", "p2"]
    assert not (store.data_dir / "partitions" / "p1").exists()
    assert_placed_once(store, fleet.sent)


def test_a_device_written_after_the_last_catch_up_pass_is_copied_in_the_switching_unit(
    store: Store, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No catch-up passes: everything written between the copy's units is copied by the last one.
    monkeypatch.setattr(moves, "CATCH_UP_PASSES", 0)
    drive(moves.adding(store, "p3"), _writing_between(fleet, new_every=1))
    assert_placed_once(store, fleet.sent)


def _away_from_home(store: Store, fleet: Fleet, device: str) -> tuple[str, str]:
    """Write `device`'s history into a partition that is not its home: (there, home)."""
    home, dev_key = store.locate(device)
    there = next(name for name in store.partitions if name != home)
    items = [
        Pending(device, dev_key, BASE_NS + i, Record(f"devices/{device}/t", b"old:%d" % i))
        for i in range(12)
    ]
    store.write(there, items)
    fleet.sent[device] = [b"old:%d" % i for i in range(12)]
    return there, home


def test_rebalance_merges_a_copy_whose_home_already_receives_new_messages(
    store: Store, fleet: Fleet
) -> None:
    """A device away from home (a layout changed by hand) whose home got a new message first.

    Before units, rebalance took any index entry at home for a finished copy and deleted the
    only copy of the device's history.
    """
    device = "stray"
    _away_from_home(store, fleet, device)
    fleet.publish([device])  # home has an entry now, with one message
    result, _ = drive(moves.rebalancing(store), lambda _n: fleet.publish([device, "dev-001"]))
    assert isinstance(result, moves.Moves)
    assert [m.device for m in result.moves] == [device]
    with StoreReader(store.data_dir) as reader:
        got = [m.record.payload for m in reader.messages(device)]
    # Every message once; the two partitions' receive times interleave in key order.
    assert sorted(got) == sorted(fleet.sent[device])
    fleet.sent[device] = got
    assert_placed_once(store, fleet.sent)


def test_rebalance_drops_a_leftover_copy_without_merging_it(store: Store, fleet: Fleet) -> None:
    device = "dev-005"
    home, dev_key = store.locate(device)
    there = next(name for name in store.partitions if name != home)
    store.partitions[there].copy_device_from(store.partitions[home], dev_key)
    drive(moves.rebalancing(store), _writing_between(fleet))
    assert_placed_once(store, fleet.sent)


def test_prune_in_units_keeps_what_is_written_between_and_counts_it(
    store: Store, fleet: Fleet
) -> None:
    cutoff_at = BASE_NS + DEVICES * 2 + 1  # the first two messages of every device are older
    work = maint.pruning(store, older_than_ns=1, now_ns=cutoff_at + 1)
    result, ran = drive(work, _writing_between(fleet))
    assert isinstance(result, maint.Pruned)
    assert ran > 10
    assert result.messages == DEVICES * 2
    for device, sent in fleet.sent.items():
        if device.startswith("dev-"):
            fleet.sent[device] = sent[2:]
    assert_placed_once(store, fleet.sent)


def test_forget_in_units_leaves_an_index_that_counts_what_stayed(
    store: Store, fleet: Fleet
) -> None:
    # At home in the first partition forgotten: what it writes between the later units stays.
    device = next(d for d in fleet.sent if store.locate(d)[0] == next(iter(store.partitions)))

    def between(_n: int) -> None:
        fleet.publish([device])

    result, ran = drive(maint.forgetting(store, device), between)
    assert isinstance(result, maint.Forgotten)
    assert ran == 4  # the home's measure, then one unit per partition
    with StoreReader(store.data_dir) as reader:
        info = reader.device(device)
        kept = [m.record.payload for m in reader.messages(device)]
    # What was written after its home's unit stays, and the index counts exactly that.
    assert kept, "written after the home's delete"
    assert kept == fleet.sent[device][-len(kept) :]
    assert info is not None
    assert info.count == len(kept)
    fleet.sent[device] = kept
    assert_placed_once(store, fleet.sent)


def test_a_restore_across_a_move_in_units_reads_every_message_once(
    store: Store, fleet: Fleet
) -> None:
    after = [*[Weighted(f"p{i}") for i in range(3)], Weighted("p3")]
    device = next(d for d in fleet.sent if place(device_key(d), after) == "p3")
    fleet.publish([device] * 40)
    reader = LiveReader(store)
    reads: list[list[bytes]] = []
    cursor = Cursor(device)

    def between(_n: int) -> None:
        fleet.publish([device])  # its new message, between two units
        nonlocal cursor
        if cursor.done:
            reads.append([])
            cursor = Cursor(device)
        reads[-1] += [m.record.payload for m in reader.read(cursor, 3)] if reads else []

    reads.append([])
    drive(moves.adding(store, "p3"), between)
    while not cursor.done:
        reads[-1] += [m.record.payload for m in reader.read(cursor, 3)]
    sent = fleet.sent[device]
    for got in reads:
        assert got, "each restore read something"
        assert len(set(got)) == len(got), "no message twice"
        assert got == sent[: len(got)], "in order, from the first, none skipped"
    assert len(reads) > 1, "restores ran before and after the switch"
    assert_placed_once(store, fleet.sent)


# ---- kill -9 at a unit boundary -----------------------------------------------------------------

_CHILD = """
import json, os, signal, sys
from pathlib import Path
from mqtt_backup import operations
from mqtt_backup.storage import Store, units
from tests.unit_fleet import Fleet, drive, write_between

data, kill_at, ledger = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
op, args = sys.argv[4], json.loads(sys.argv[5])
units.UNIT_KEYS = 5
store = Store.open(data, create=False)
fleet = Fleet(store)
fleet.sent = {d: [p.encode() for p in ps] for d, ps in json.loads(ledger.read_text()).items()}
between = write_between(fleet)

def then_maybe_die(n):
    between(n)
    # Acknowledged: in the ledger only once stored (the file is replaced atomically).
    tmp = ledger.with_suffix(".tmp")
    tmp.write_text(json.dumps({d: [p.decode() for p in ps] for d, ps in fleet.sent.items()}))
    os.replace(tmp, ledger)
    if n == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

drive(operations.units(store, op, args), then_maybe_die)
store.close()
"""


def _base_store(data: Path) -> dict[str, list[bytes]]:
    store = Store.open(data, partitions=3)
    try:
        fleet = Fleet(store)
        for _ in range(PER_DEVICE):
            fleet.publish(f"dev-{d:03d}" for d in range(DEVICES))
        return fleet.sent
    finally:
        store.close()


# (operation, its arguments, the partitions after it)
_KILLED = {
    "add": ("partitions-add", {"name": "p3"}, ["p0", "p1", "p2", "p3"]),
    "remove": ("partitions-remove", {"name": "p1"}, ["p0", "p2"]),
}


def _kill_points(base: Path, scratch: Path, killed: str) -> list[int]:
    """Unit boundaries to kill at: the first, mid-copy, the last two before the switch, the
    first after it, and the last (learnt from a run of the same operation on a copy of the
    store: the same writes make the same units)."""
    op, args, after = _KILLED[killed]
    shutil.copytree(base, scratch)
    store = Store.open(scratch, create=False)
    try:
        fleet = Fleet(store)
        between = write_between(fleet)
        switched: list[bool] = []

        def note(n: int) -> None:
            between(n)
            switched.append([s.name for s in store.manifest.partitions] == after)

        drive(operations.units(store, op, args), note)
    finally:
        store.close()
    first_after = switched.index(True) + 1
    assert first_after > 6, switched
    # After the first unit, mid-copy, the last unit before the switch, the switch, the end.
    points = [1, first_after // 2, first_after - 1, first_after, len(switched)]
    return sorted(set(points))


@pytest.mark.slow  # a process killed per kill point
@pytest.mark.parametrize("killed", ["add", "remove"])
def test_kill_9_at_unit_boundaries_of_a_move_loses_nothing(tmp_path: Path, killed: str) -> None:
    op, args, after = _KILLED[killed]
    base = tmp_path / "base"
    sent_before = _base_store(base)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for kill_at in _kill_points(base, tmp_path / "scratch", killed):
        data, ledger = tmp_path / f"data-{kill_at}", tmp_path / f"ledger-{kill_at}.json"
        shutil.copytree(base, data)
        ledger.write_text(
            json.dumps({d: [p.decode() for p in ps] for d, ps in sent_before.items()})
        )
        child = [sys.executable, "-c", _CHILD, str(data)]
        operation = [op, json.dumps(args)]
        killed_run = subprocess.run(
            [*child, str(kill_at), str(ledger), *operation],
            cwd=REPO,
            env=env,
            capture_output=True,
            check=False,
        )
        assert killed_run.returncode == -signal.SIGKILL, killed_run.stderr.decode()
        sent = {d: [p.encode() for p in ps] for d, ps in json.loads(ledger.read_text()).items()}
        with StoreReader(data) as reader:  # it opens, and every stored message reads once
            for device, payloads in sent.items():
                got = [m.record.payload for m in reader.messages(device)]
                assert got == payloads, (kill_at, device)
            switched = [spec.name for spec in reader.manifest.partitions] == after
        # A re-run of the same command (with writes between its units too) finishes the move; a
        # remove killed after its switch has nothing left to do (the next open buried the
        # partition, and a re-run says there is no such partition): a rebalance checks instead.
        # It runs here, as the child would, on the store the kill left (a second child process
        # cost start-up and proved nothing more: the store keeps nothing of a process but disk).
        again, again_args = ("rebalance", {}) if killed == "remove" and switched else (op, args)
        store = Store.open(data, create=False)
        try:
            fleet = Fleet(store)
            fleet.sent = sent
            drive(operations.units(store, again, again_args), write_between(fleet))
        finally:
            store.close()
        store = Store.open(data, create=False)
        try:
            assert [s.name for s in store.manifest.partitions] == after
            assert_placed_once(store, sent)
        finally:
            store.close()
