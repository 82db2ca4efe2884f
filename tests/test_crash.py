"""The bridge as a real process: kill -9 loses nothing the broker accepted; SIGTERM is clean."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from mqtt_backup.storage import StoreReader
from tests.conftest import (
    Broker,
    Sent,
    bridge_process,
    device_client,
    read_all,
    stored_count,
    wait_until,
)

# Real processes killed and stopped by signals: `make test` only. In this process,
# test_ingest_e2e's crash between sync and ack covers what a kill leaves behind.
pytestmark = pytest.mark.slow


def _wait_running(proc: subprocess.Popen[bytes], log: Path) -> None:
    def running() -> bool:
        assert proc.poll() is None, log.read_text()
        return log.exists() and "mqtt-backup running" in log.read_text()

    wait_until(running, 20, "the bridge to start")


async def _publish_with_ledger(broker: Broker, messages: list[Sent], ledger: list[Sent]) -> None:
    """Publish QoS 1 in order; a message enters the ledger once the broker acknowledged it."""
    async with device_client(broker) as client:
        for msg in messages:
            await client.publish(msg.topic, msg.payload, qos=1)
            ledger.append(msg)


async def _kill_when_stored(proc: subprocess.Popen[bytes], data: Path, threshold: int) -> None:
    while stored_count(data) < threshold:
        await asyncio.sleep(0.02)
    proc.kill()  # SIGKILL: no flush, no acks, no goodbye


def test_kill_9_mid_publish_loses_nothing_the_broker_accepted(
    broker: Broker, data_dir: Path, unique: str, tmp_path: Path
) -> None:
    log = tmp_path / "bridge.log"
    proc = bridge_process(broker, data_dir, log=log)
    _wait_running(proc, log)
    messages = [Sent(f"devices/{unique}-{i % 10}/t", f"msg {i}".encode()) for i in range(3000)]
    ledger: list[Sent] = []
    killed_at: list[int] = []

    async def scenario() -> None:
        publisher = asyncio.create_task(_publish_with_ledger(broker, messages, ledger))
        await _kill_when_stored(proc, data_dir, 800)
        killed_at.append(len(ledger))
        await publisher

    asyncio.run(scenario())
    assert proc.wait(10) == -signal.SIGKILL
    assert len(ledger) == 3000
    assert killed_at[0] < 3000, "the kill must land while the publisher is still publishing"

    proc = bridge_process(broker, data_dir, log=log)
    _wait_running(proc, log)
    wait_until(lambda: stored_count(data_dir) >= 3000, 60, "every ledgered message")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text()

    stored = [m for msgs in read_all(data_dir).values() for m in msgs]
    copies = Counter(m.record.payload for m in stored)
    first_copies = Counter(m.record.payload for m in stored if not m.record.dup)
    missing = [m.payload for m in ledger if copies[m.payload] == 0]
    assert missing == [], f"{len(missing)} acknowledged messages lost"
    # A second copy only comes from the broker's redelivery, which sets DUP.
    assert all(n <= 1 for n in first_copies.values()), "an unflagged duplicate"
    print(f"killed after {killed_at[0]} acknowledged publishes; {len(stored)} stored copies")
    with StoreReader(data_dir) as reader:
        counted = sum(d.dups for d in reader.devices())
    assert counted == sum(1 for m in stored if m.record.dup)


def test_sigterm_stores_pending_and_exits_zero(
    broker: Broker, data_dir: Path, unique: str, tmp_path: Path
) -> None:
    log = tmp_path / "bridge.log"
    proc = bridge_process(broker, data_dir, log=log)
    _wait_running(proc, log)
    messages = [Sent(f"devices/{unique}/t", f"{i}".encode()) for i in range(200)]
    asyncio.run(_publish_with_ledger(broker, messages, []))
    wait_until(lambda: stored_count(data_dir) >= 200, 30, "the messages")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    text = log.read_text()
    assert "stopped: 200 messages stored this run" in text
    assert "Traceback" not in text


def test_the_stop_line_counts_one_message_as_one(
    broker: Broker, data_dir: Path, unique: str, tmp_path: Path
) -> None:
    # Found by a new user: "stopped: 1 messages stored this run".
    log = tmp_path / "bridge.log"
    proc = bridge_process(broker, data_dir, log=log)
    _wait_running(proc, log)
    asyncio.run(_publish_with_ledger(broker, [Sent(f"devices/{unique}/t", b"1")], []))
    wait_until(lambda: stored_count(data_dir) >= 1, 30, "the message")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "stopped: 1 message stored this run" in log.read_text()
