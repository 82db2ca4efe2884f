"""Storage fails under the bridge: a full disk, a slow fsync, damaged data, a stall past expiry.

Injected faults go through `tests/faulty.py` (the `Bridge(wrap_store=...)` seam); damaged data is
real damage to the RocksDB files.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mqtt_backup.config import Settings
from mqtt_backup.storage.manifest import load_manifest
from tests.conftest import BridgeThread, Broker, make_settings, wait_until
from tests.faults.conftest import Report
from tests.faults.harness import (
    RATE,
    Publisher,
    above,
    assert_nothing_lost,
    cli,
    fleet,
    marker,
    read_back,
    restored,
    size,
    terminal,
    wait_markers,
    wait_stored,
)
from tests.faulty import Faults
from tests.test_checks import device_records, raw_partition

pytestmark = pytest.mark.slow
RunBridge = Callable[..., BridgeThread]


@pytest.mark.usefixtures("transport")  # the hold and its pause are the transport's
def test_disk_full_injected_during_a_continuous_publish(
    own_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge, report: Report
) -> None:
    """Disk full (injected) during a continuous publish, then room again"""
    episodes, between = size(2, 10), size(250, 1000)
    faults = Faults()
    bridge = run_bridge(make_settings(own_broker, data_dir), wrap_store=faults.wrap)
    publisher = Publisher(own_broker.port, fleet(unique, 4), rate=RATE).start()
    for _ in range(episodes):
        publisher.wait_accepted(between)
        failed, written = faults.calls["write_failed"], faults.calls["write"]
        faults.failing = True
        wait_until(above(lambda: faults.calls["write_failed"], failed + 2), 60, "failing writes")
        faults.failing = False
        wait_until(above(lambda: faults.calls["write"], written), 60, "the bridge to resume")
    publisher.wait_accepted(between)
    ledger = publisher.stop()
    back = read_back(ledger, data_dir, own_broker.url)
    bridge.stop()
    report(
        episodes=episodes,
        export=back.export,
        restore=back.restore,
        failed_writes=faults.calls["write_failed"],
    )
    assert_nothing_lost(back)


def test_slow_fsync_injected(
    own_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge, report: Report
) -> None:
    """Slow fsync (every write takes 50 ms more) under a continuous publish"""
    faults = Faults(write_delay_s=0.05)
    bridge = run_bridge(make_settings(own_broker, data_dir), wrap_store=faults.wrap)
    publisher = Publisher(own_broker.port, fleet(unique, 4), rate=RATE).start()
    publisher.wait_accepted(size(1500, 10_000), timeout=300)
    ledger = publisher.stop()
    started = time.monotonic()
    wait_stored(data_dir, ledger, timeout=300)
    back = read_back(ledger, data_dir, own_broker.url)
    bridge.stop()
    report(
        export=back.export,
        restore=back.restore,
        writes=faults.calls["write"],
        catch_up_s=round(time.monotonic() - started, 1),
    )
    assert_nothing_lost(back)


@pytest.mark.usefixtures("transport")  # the hold across a broker restart: the reconnect's
def test_message_expiry_during_a_storage_stall(
    own_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge, report: Report
) -> None:
    """Message expiry during a storage stall while the broker restarts"""
    expiry_s, held = 2, size(60, 90)  # below the bridge's Receive Maximum (100): all are held
    settings = make_settings(own_broker, data_dir)
    run_bridge(settings).stop()  # the session exists
    faults = Faults(failing=True)
    bridge = run_bridge(settings, wrap_store=faults.wrap)
    devices = fleet(unique, 3)
    ledger = Publisher(own_broker.port, devices, limit=held, expiry=expiry_s).start().wait_done()
    wait_until(lambda: bridge.bridge.pipeline.pending >= held, 30, "the bridge to hold them all")
    own_broker.stop()
    # Expiry is elapsed time on the broker: nothing to wait for but the clock.
    time.sleep(expiry_s + 1)
    own_broker.start()
    wait_until(lambda: bridge.bridge._transport.connected, 60, "the bridge to reconnect")
    faults.failing = False
    wait_markers(data_dir, ledger, marker(own_broker.port, devices, ledger))
    # The restore side reconnects on its own backoff; a request sent before it listens is lost.
    wait_until(bridge.bridge.restore_listening.is_set, 60, "the restore service")
    back = read_back(ledger, data_dir, own_broker.url)
    bridge.stop()
    report(held=held, expiry_s=expiry_s, export=back.export, restore=back.restore)
    assert_nothing_lost(back)


def _filled(
    own_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> tuple[Settings, list[str]]:
    settings = make_settings(own_broker, data_dir)
    bridge = run_bridge(settings)
    devices = fleet(unique, 6)
    ledger = Publisher(own_broker.port, devices, limit=size(600, 6000)).start().wait_done()
    wait_stored(data_dir, ledger)
    bridge.stop()
    return settings, devices


def _one_line_error(done: object) -> None:
    stderr = getattr(done, "stderr", "")
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_damaged_record_is_found_by_verify_and_by_reads(
    own_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge, report: Report
) -> None:
    """Corruption: a flipped byte in one record, found by verify, export and restore"""
    settings, devices = _filled(own_broker, data_dir, unique, run_bridge)
    victim = devices[1]
    partition = _partition_of(data_dir, victim)
    _flip_a_byte(data_dir, partition, victim)

    checked = cli("verify", "--data", str(data_dir), "--json")
    problems = json.loads(checked.stdout)["problems"]
    export_all = cli("export", "--data", str(data_dir))
    export_other = cli("export", "--data", str(data_dir), "--device", devices[0])
    bridge = run_bridge(settings)
    wait_until(bridge.bridge.restore_listening.is_set, 30, "the restore service")
    answer = terminal(own_broker.url, victim)
    healthy = restored(own_broker.url, [d for d in devices if d != victim])
    bridge.stop()
    report(
        verify_exit=checked.returncode,
        verify_problems=[p["problem"] for p in problems],
        export_exit=export_all.returncode,
        restore_of_the_damaged_device=answer.get("error", "done"),
        healthy_devices_restored=healthy.complete,
    )
    assert checked.returncode == 4
    assert [(p["device"], p["problem"]) for p in problems] == [
        (victim, "corrupt record: checksum mismatch")
    ]
    assert export_all.returncode == 4, export_all.stderr
    _one_line_error(export_all)
    assert export_other.returncode == 0, export_other.stderr
    assert "error" in answer, f"a damaged history was restored as {answer}"
    assert healthy.complete, healthy.terminals


def test_damaged_table_file_is_found_by_verify_and_by_reads(
    own_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge, report: Report
) -> None:
    """Corruption: a damaged block in an SST file, found by verify and export"""
    _, devices = _filled(own_broker, data_dir, unique, run_bridge)
    partition = _partition_of(data_dir, devices[0])
    with raw_partition(data_dir, partition) as (db, _):
        db.flush()
    spec = next(s for s in load_manifest(data_dir).partitions if s.name == partition)
    table = max(spec.directory(data_dir).glob("*.sst"), key=lambda f: f.stat().st_size)
    data = bytearray(table.read_bytes())
    data[len(data) // 3] ^= 0xFF
    table.write_bytes(bytes(data))

    checked = cli("verify", "--data", str(data_dir))
    export_all = cli("export", "--data", str(data_dir))
    report(verify_exit=checked.returncode, export_exit=export_all.returncode)
    assert checked.returncode == 4, checked.stdout
    assert export_all.returncode == 4, export_all.stderr
    _one_line_error(export_all)
    _one_line_error(checked)


def _flip_a_byte(data_dir: Path, partition: str, device: str) -> None:
    with raw_partition(data_dir, partition) as (db, _index):
        key, value = device_records(db, device)[3]
        damaged = bytearray(value)
        damaged[-1] ^= 0x01
        db[key] = bytes(damaged)
    del db, _index
    gc.collect()  # rocksdict handles (a column family's too) keep the lock until collected


def _partition_of(data_dir: Path, device: str) -> str:
    from mqtt_backup.storage import StoreReader  # noqa: PLC0415 - as in tests/conftest

    with StoreReader(data_dir) as reader:
        info = reader.device(device)
    assert info is not None
    return info.partition
