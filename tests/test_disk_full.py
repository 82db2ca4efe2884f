"""A real full disk (ENOSPC from the kernel, not injected): the tool itself frees it.

A small tmpfs is mounted in a new mount namespace, held by a sleeping process; this process
reaches it through `/proc/<pid>/root`, so RocksDB's own open, WAL replay, flush and compaction
hit the full filesystem. Needs root (unshare -m and mount); skipped elsewhere, with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.errors import StorageUnavailable
from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store, StoreReader, ballast
from mqtt_backup.storage.ballast import BALLAST, FULL_BELOW_BYTES
from tests.conftest import BridgeThread, Broker, Sent, make_settings, publish, wait_until
from tests.faulty import Faults

# The tests on a real full disk are `serial` (make test runs them alone, after the others): how
# full the disk is when RocksDB meets ENOSPC, and what its background flushes, compactions and
# file deletions hold at each step, follow the machine's load; their margins are measured alone.
DISK_MIB = 64
PAYLOAD = 20_000
runner = CliRunner()


def _unshare_refused() -> str | None:
    if os.geteuid() != 0:
        return "a real full disk needs root (unshare -m and a tmpfs mount)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"unshare -m with a tmpfs mount is not permitted here: {probe.stderr.strip()}"
    return None


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data dir path on a 64 MiB tmpfs of its own (gone with the holder process)."""
    if (reason := _unshare_refused()) is not None:
        pytest.skip(reason)
    monkeypatch.setattr(ballast, "MAX_BYTES", 64 * 1024 * 1024)  # an 8th of the disk, then
    mount = tmp_path / "disk"
    mount.mkdir()
    holder = subprocess.Popen(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount -t tmpfs -o size={DISK_MIB}m tmpfs {mount} && exec sleep 600",
        ],
    )
    # The holder's view of the filesystem: the tmpfs is mounted there, and only there.
    seen = Path(f"/proc/{holder.pid}/root") / mount.relative_to("/")
    try:
        wait_until(lambda: shutil.disk_usage(seen).total == DISK_MIB * 1024 * 1024, 10, "the mount")
        yield seen / "data"
    finally:
        holder.kill()
        holder.wait()


def free(data: Path) -> int:
    return shutil.disk_usage(data).free


def wait_for_room(data: Path, operation: str) -> None:
    """RocksDB deletes obsolete files in the background: wait for them, then the disk is not full.

    Not full is what the bridge means by it (`ballast.FULL_BELOW_BYTES`), with the ballast made
    again on top. A margin of 4 MiB more failed under load: how much the full disk's last round
    had stored (and the deletion then frees) depends on when RocksDB met ENOSPC, the filler took
    the rest. On a timeout the message lists what holds the disk.
    """
    wait_until(
        lambda: free(data) > FULL_BELOW_BYTES,
        30,
        lambda: (
            f"{operation} to give the space back; free {free(data)} bytes; " + disk_listing(data)
        ),
    )


def disk_listing(data: Path) -> str:
    """The files of the small disk, largest first (what holds it when it stays full)."""
    files = [p for p in data.parent.rglob("*") if p.is_file()]
    sizes = sorted(((p.stat().st_size, p.relative_to(data.parent)) for p in files), reverse=True)
    return ", ".join(f"{path}={size}" for size, path in sizes[:25])


def fill_until_full(data: Path, round_no: int = 0) -> None:
    """Write through the store until the kernel refuses (ENOSPC), then fill what is left.

    A compaction that hits ENOSPC deletes its half-written output, which leaves room: a
    filler file beside the data directory (another program's, say) takes it.
    """
    assert "No space left on device" in write_until_refused(data)
    filler = data.parent / f"filler-{round_no}"
    with filler.open("wb") as f:
        while free(data) > 256 * 1024:
            f.write(b"\0" * 65536)
            f.flush()
    assert free(data) < 1024 * 1024


def write_until_refused(data: Path) -> str:
    """One round of writes through the store, until it refuses one."""
    try:
        store = Store.open(data, partitions=2)
    except StorageUnavailable as exc:
        return exc.message()
    n = 0
    try:
        while True:
            items = []
            for _ in range(20):
                n += 1
                device = "chatty" if n % 10 else f"dev-{n % 7}"
                partition, dev_key = store.locate(device)
                record = Record(f"devices/{device}/t", os.urandom(PAYLOAD))
                items.append((partition, Pending(device, dev_key, time.time_ns(), record)))
            for partition in {p for p, _ in items}:
                store.write(partition, [i for p, i in items if p == partition])
    except StorageUnavailable as exc:
        return exc.message()
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.serial
def test_prune_and_forget_free_a_full_disk_offline(small_disk: Path) -> None:
    data = small_disk
    fill_until_full(data)

    pruned = runner.invoke(
        app, ["prune", "--data", str(data), "--max-bytes-per-device", "200000", "--json"]
    )
    assert pruned.exit_code == 0, pruned.output
    assert json.loads(pruned.stdout)["messages"] > 0
    wait_for_room(data, "prune")
    assert (data / BALLAST).is_file(), "the ballast is back once there is room"

    fill_until_full(data, 1)
    forgot = runner.invoke(app, ["forget", "chatty", "--data", str(data), "--json"])
    assert forgot.exit_code == 0, forgot.output
    assert json.loads(forgot.stdout)["messages"] > 0
    wait_for_room(data, "forget")
    assert (data / BALLAST).is_file()
    with StoreReader(data) as reader:
        assert reader.device("chatty") is None
        assert reader.devices(), "the other devices are kept"
    write_until_refused(data)  # and the store takes writes again


@pytest.mark.slow
@pytest.mark.serial
def test_a_dry_run_on_a_full_disk_keeps_the_ballast(small_disk: Path) -> None:
    data = small_disk
    fill_until_full(data)
    for args in (["forget", "chatty", "--dry-run"], ["prune", "--older-than", "1d", "--dry-run"]):
        result = runner.invoke(app, [*args, "--data", str(data)])
        # It may not even open a full disk; then it says how to free it. Either way the reserve
        # stays for the prune or forget that deletes.
        assert result.exit_code in (0, 4), result.output
        if result.exit_code == 4:
            assert "the disk is full" in result.output, result.output
        assert (data / BALLAST).is_file(), f"{args[0]} --dry-run spent the ballast"
    forgot = runner.invoke(app, ["forget", "chatty", "--data", str(data), "--json"])
    assert forgot.exit_code == 0, forgot.output


@pytest.mark.slow
@pytest.mark.serial
def test_prune_frees_a_full_disk_through_the_running_bridge(
    small_disk: Path, broker: Broker, unique: str
) -> None:
    data = small_disk
    bridge = BridgeThread(make_settings(broker, data, batch_max=20))
    try:
        payload = os.urandom(PAYLOAD)
        # More than the disk holds: the bridge stalls on ENOSPC, the broker keeps the rest.
        publish(broker, [Sent(f"devices/{unique}/t", payload) for _ in range(DISK_MIB * 60)])
        wait_until(lambda: bridge.bridge._transport.stall.active, 60, "storage to stall")
        # A write, flush or compaction that hit ENOSPC leaves its partial file behind a moment.
        assert free(data) < FULL_BELOW_BYTES
        assert (data / BALLAST).is_file(), "ingest never eats the ballast"

        pruned = runner.invoke(
            app, ["prune", "--data", str(data), "--max-bytes-per-device", "100000", "--json"]
        )
        assert pruned.exit_code == 0, pruned.output
        assert json.loads(pruned.stdout)["messages"] > 0
        wait_until(lambda: free(data) > DISK_MIB * 1024 * 1024 // 2, 30, "the space back")
        wait_until(lambda: not bridge.bridge._transport.stall.active, 60, "ingest to resume")
    finally:
        bridge.stop()


def test_a_new_store_reserves_its_ballast_and_makes_it_again(data_dir: Path) -> None:
    store = Store.open(data_dir, partitions=2)
    try:
        path = data_dir / BALLAST
        assert path.stat().st_size == ballast.size_for(data_dir)
        assert path.stat().st_blocks * 512 >= path.stat().st_size, "allocated, not sparse"
        assert path.stat().st_mode & 0o777 == 0o600
        assert not store.make_room(), "a disk with room keeps its ballast"
        assert ballast.release(data_dir) == ballast.size_for(data_dir)
        assert not path.exists()
        store.keep_ballast()
        assert path.stat().st_size == ballast.size_for(data_dir)
    finally:
        store.close()


def test_an_operation_on_a_full_disk_stops_rocksdbs_own_compactions(data_dir: Path) -> None:
    """Partitions open from before (a bridge whose last write got through, on a disk short of
    room) had RocksDB's compactions on: one pending would spend the released ballast rewriting
    what the prune is about to delete, and the prune's own flush and reclaim then met ENOSPC.
    """
    store = Store.open(data_dir, partitions=2)
    try:
        assert all(part.compactions for part in store.partitions.values())
        opened = store.opened
        assert store.make_room(stalled=True)
        assert not (data_dir / BALLAST).exists(), "released for the operation"
        assert store.opened == opened + 1, "the partitions were opened again"
        assert not any(part.compactions for part in store.partitions.values())
        store.done_freeing()
        assert all(part.compactions for part in store.partitions.values())
        assert (data_dir / BALLAST).is_file()
    finally:
        store.close()


def test_a_prune_through_a_stalled_bridge_owns_the_room_it_frees(
    broker: Broker, data_dir: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    """Ingest stalled on storage: a deleting operation must not commit first.

    A stalled bridge is a full disk even when a free-space reading says otherwise for a moment
    (a failed flush or compaction has just deleted its partial file): a commit before the prune
    would take that room, or fail and fail the prune with it. The operation owns the room until
    its reclaim is done; then compactions are on again and the ballast is back.
    """
    faults = Faults()
    bridge = run_bridge(make_settings(broker, data_dir, batch_max=20), wrap_store=faults.wrap)
    publish(broker, [Sent(f"devices/{unique}/t", os.urandom(1000)) for _ in range(50)])
    wait_until(lambda: bridge.bridge.pipeline.counters.stored == 50, 30, "the first 50 stored")
    faults.failing = True
    publish(broker, [Sent(f"devices/{unique}/t", b"held") for _ in range(5)])
    wait_until(lambda: bridge.bridge._transport.stall.active, 30, "storage to stall")
    failed = faults.calls["write_failed"]

    pruned = runner.invoke(
        app, ["prune", "--data", str(data_dir), "--max-bytes-per-device", "5000", "--json"]
    )
    assert pruned.exit_code == 0, pruned.output
    assert json.loads(pruned.stdout)["messages"] > 0
    assert faults.calls["write_failed"] == failed, "ingest committed before the prune"
    store = bridge.bridge.store
    assert not store.freeing_space, "the operation ended: compactions are on again"
    assert (data_dir / BALLAST).is_file(), "the ballast is back: the disk has room"

    faults.failing = False
    wait_until(lambda: bridge.bridge.pipeline.counters.stored == 55, 60, "the held 5 stored")
    with StoreReader(data_dir) as reader:
        info = reader.device(unique)
        assert info is not None
        assert info.count == 55 - json.loads(pruned.stdout)["messages"]
