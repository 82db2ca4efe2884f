"""snapshot, prune and forget: offline on the store, and through a running bridge's socket."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.config import Settings
from mqtt_backup.control import RemoteError, call
from mqtt_backup.errors import DataDirMissing, UsageError
from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store, StoreReader, checks, maintenance
from mqtt_backup.times import NS_PER_S
from tests.conftest import (
    BridgeThread,
    Broker,
    Sent,
    make_settings,
    publish,
    read_all,
    stored_count,
    wait_until,
)

RunBridge = Callable[[Settings], BridgeThread]
T0 = 1_700_000_000 * NS_PER_S
runner = CliRunner()


def fill(data: Path, devices: int = 4, per_device: int = 10, step_s: int = 60) -> None:
    """Each device gets messages at T0, T0+step, ... (10 bytes of payload each)."""
    store = Store.open(data, partitions=3)
    try:
        # In time order across devices: devices sharing a partition share its clock.
        for i in range(per_device):
            for d in range(devices):
                device = f"dev-{d}"
                partition, dev_key = store.locate(device)
                record = Record(f"devices/{device}/t", b"%010d" % i)
                store.write(
                    partition, [Pending(device, dev_key, T0 + i * step_s * NS_PER_S + d, record)]
                )
    finally:
        store.close()


def payloads(data: Path, device: str) -> list[bytes]:
    with StoreReader(data) as reader:
        return [m.record.payload for m in reader.messages(device)]


def index_of(data: Path, device: str) -> tuple[int, int, int] | None:
    with StoreReader(data) as reader:
        info = reader.device(device)
    return None if info is None else (info.count, info.first_ns, info.size)


def test_prune_older_than_keeps_exactly_the_newer_messages(data_dir: Path) -> None:
    fill(data_dir)
    store = Store.open(data_dir, create=False)
    try:
        now = T0 + 9 * 60 * NS_PER_S  # the newest message's time
        cut = 4 * 60 * NS_PER_S + 1
        dry = maintenance.prune(store, older_than_ns=cut, dry_run=True, now_ns=now)
        assert (dry.messages, len(dry.devices)) == (20, 4)
        assert len(payloads(data_dir, "dev-0")) == 10, "a dry run changes nothing"
        done = maintenance.prune(store, older_than_ns=cut, now_ns=now)
    finally:
        store.close()
    assert done.messages == 20
    for d in range(4):
        assert payloads(data_dir, f"dev-{d}") == [b"%010d" % i for i in range(5, 10)]
        count, first, _ = index_of(data_dir, f"dev-{d}") or (0, 0, 0)
        assert (count, first) == (5, T0 + 5 * 60 * NS_PER_S + d), "the index follows"


def test_prune_max_bytes_keeps_the_newest_that_fit(data_dir: Path) -> None:
    fill(data_dir, devices=2)
    with StoreReader(data_dir) as reader:
        one = next(reader.messages("dev-0"))
    store = Store.open(data_dir, create=False)
    try:
        size = index_of(data_dir, "dev-0")
        assert size is not None
        per_message = size[2] // 10
        maintenance.prune(store, max_bytes_per_device=3 * per_message)
    finally:
        store.close()
    assert payloads(data_dir, "dev-0") == [b"%010d" % i for i in range(7, 10)]
    assert one.record.payload == b"%010d" % 0


def test_forget_a_device_or_its_past(data_dir: Path) -> None:
    fill(data_dir)
    store = Store.open(data_dir, create=False)
    try:
        part = maintenance.forget(store, "dev-1", before_ns=T0 + 3 * 60 * NS_PER_S)
        whole = maintenance.forget(store, "dev-2")
        nobody = maintenance.forget(store, "nobody")
    finally:
        store.close()
    assert part.removed.messages == 3
    assert payloads(data_dir, "dev-1") == [b"%010d" % i for i in range(3, 10)]
    assert whole.removed.messages == 10
    assert payloads(data_dir, "dev-2") == []
    assert index_of(data_dir, "dev-2") is None, "a forgotten device leaves the listing"
    assert nobody.removed.messages == 0
    assert len(payloads(data_dir, "dev-0")) == 10


def test_snapshot_opens_as_a_data_dir(data_dir: Path, tmp_path: Path) -> None:
    fill(data_dir)
    dest = tmp_path / "copy"
    store = Store.open(data_dir, create=False)
    try:
        result = maintenance.snapshot(store, dest)
        with pytest.raises(UsageError, match="not an empty directory"):
            maintenance.snapshot(store, dest)
    finally:
        store.close()
    assert result.partitions == ("p0", "p1", "p2")
    assert read_all(dest).keys() == read_all(data_dir).keys()
    for device, msgs in read_all(data_dir).items():
        assert [m.record for m in read_all(dest)[device]] == [m.record for m in msgs]
    Store.open(dest, create=False).close()  # a writer can take the copy over


def test_cli_offline_commands(data_dir: Path, tmp_path: Path) -> None:
    fill(data_dir)
    dry = runner.invoke(app, ["forget", "dev-0", "--data", str(data_dir), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["messages"] == 10
    gone = runner.invoke(app, ["forget", "dev-0", "--data", str(data_dir)])
    assert gone.exit_code == 0, gone.output
    assert "deleted 10 messages" in gone.output
    pruned = runner.invoke(app, ["prune", "--data", str(data_dir), "--older-than", "1d", "--json"])
    assert pruned.exit_code == 0, pruned.output
    assert json.loads(pruned.output)["messages"] == 30, "everything is older than a day"
    snap = runner.invoke(app, ["snapshot", str(tmp_path / "s"), "--data", str(data_dir)])
    assert snap.exit_code == 0, snap.output
    missing = runner.invoke(app, ["prune", "--data", str(tmp_path / "none"), "--older-than", "1d"])
    assert missing.exit_code == DataDirMissing.exit_code
    assert not (tmp_path / "none").exists(), "a missing data dir is not created"
    nothing = runner.invoke(app, ["prune", "--data", str(data_dir)])
    assert nothing.exit_code == 2


def test_operations_go_through_the_running_bridge(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    bridge = run_bridge(make_settings(broker, data_dir))
    publish(broker, [Sent(f"devices/{unique}-{i % 2}/t", b"m%d" % i) for i in range(40)])
    wait_until(lambda: stored_count(data_dir) >= 40, 20, "stored messages")
    forgotten = runner.invoke(app, ["forget", f"{unique}-0", "--data", str(data_dir), "--json"])
    assert forgotten.exit_code == 0, forgotten.output
    assert json.loads(forgotten.output)["messages"] == 20
    assert stored_count(data_dir) == 20
    with pytest.raises(RemoteError, match="unknown operation"):
        call(data_dir, "format-disk", {})
    bridge.stop()
    assert not (data_dir / "control.sock").exists()


def test_snapshot_during_ingest_is_consistent(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge, tmp_path: Path
) -> None:
    run_bridge(make_settings(broker, data_dir))
    stop = threading.Event()

    def keep_publishing() -> None:
        i = 0
        while not stop.is_set():
            publish(broker, [Sent(f"devices/{unique}-{j}/t", b"%d" % (i + j)) for j in range(5)])
            i += 5

    publisher = threading.Thread(target=keep_publishing, daemon=True)
    publisher.start()
    wait_until(lambda: stored_count(data_dir) >= 100, 20, "ingest to get going")
    dest = tmp_path / "hot"
    result = runner.invoke(app, ["snapshot", str(dest), "--data", str(data_dir)])
    stop.set()
    publisher.join(10)
    assert result.exit_code == 0, result.output
    copy = read_all(dest)
    with StoreReader(dest) as reader:
        listed = {d.device: d.count for d in reader.devices()}
    assert {device: len(msgs) for device, msgs in copy.items()} == listed, "index == data"
    assert sum(listed.values()) >= 100
    report = checks.verify(dest)
    assert report.ok, [p.describe() for p in report.problems]
    live = read_all(data_dir)
    for device, msgs in copy.items():
        # The copy is a prefix of the live history: nothing in it that the bridge did not keep.
        assert [m.record for m in msgs] == [m.record for m in live[device][: len(msgs)]]


def test_retention_in_run_prunes_by_itself(
    broker: Broker, data_dir: Path, run_bridge: RunBridge
) -> None:
    fill(data_dir, devices=3, per_device=10)
    run_bridge(make_settings(broker, data_dir, partitions=None, prune_older_than="30d"))
    # Everything was received in 2023: the first retention pass, right after start, takes it.
    wait_until(lambda: stored_count(data_dir) == 0, 20, "the retention pass")
