"""Restore over MQTT of one stored fleet, read by several tests (DESIGN.md section 4).

The fleet is stored once per module by one bridge; these tests only read. It lives in its own
module so that its bridge, which answers every restore request, runs beside no other bridge.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.storage import StoreReader, ballast
from mqtt_backup.times import NS_PER_S, format_ts
from tests.conftest import (
    BridgeThread,
    Broker,
    Sent,
    make_settings,
    publish,
    stored_count,
    turn_down_timing,
    wait_until,
)
from tests.test_restore_e2e import _payload_bytes, _records, ask


def _fleet(unique: str) -> list[Sent]:
    rng = random.Random(11)
    sent = []
    # 1,000 (it was 2,000): still 200 per device, three restore windows of 64 in flight and 4 of
    # the bridge's batches of 50 each; 200 KiB payloads (ten), empty, binary, JSON, status topics
    # and retained messages on the same devices as before.
    for i in range(1000):
        device = f"{unique}-{i % 5}"
        kind = i % 100
        payload = (
            b""
            if kind == 0
            else rng.randbytes(200 * 1024)
            if kind == 1
            else rng.randbytes(rng.randint(1, 40))
            if kind % 2
            else f'{{"i": {i}}}'.encode()
        )
        topic = f"devices/{device}/{'status' if i % 7 == 0 else 'telemetry'}"
        sent.append(Sent(topic, payload, retain=(i % 97 == 0)))
    return sent


@dataclass(frozen=True)
class Fleet:
    """A running bridge that holds the messages `sent` over 5 devices `<unique>-<0..4>`."""

    sent: list[Sent]
    bridge: BridgeThread
    data: Path
    unique: str


@pytest.fixture(scope="module")
def stored_fleet(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """1,000 messages over 5 devices (binary, empty, 200 KiB, retained), stored once per module.

    The tests that use it only read, so they share one bridge and one data directory.
    """
    unique = uuid.uuid4().hex[:8]
    data = tmp_path_factory.mktemp("fleet") / "data"
    sent = _fleet(unique)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ballast, "MAX_BYTES", 1024 * 1024)  # as clean_env does for each test
        turn_down_timing(patch)  # as quick_timing does for each test (set up after this)
        bridge = BridgeThread(make_settings(broker, data))
        try:
            wait_until(bridge.bridge.restore_listening.is_set, 20, "the restore service")
            publish(broker, sent)
            wait_until(lambda: stored_count(data) >= len(sent), 60, "the fleet to be stored")
            yield Fleet(sent, bridge, data, unique)
        finally:
            bridge.stop()
            publish(broker, [Sent(m.topic, b"", retain=True) for m in sent if m.retain])


def test_round_trip_is_byte_exact_in_order_for_every_device(
    broker: Broker, stored_fleet: Fleet
) -> None:
    sent, unique = stored_fleet.sent, stored_fleet.unique
    for d in range(5):
        device = f"{unique}-{d}"
        expected = [m for m in sent if m.topic.split("/")[1] == device]
        answers = ask(broker, device, {"id": f"req-{d}"})
        records, terminal = _records(answers), answers[-1]
        assert terminal == {
            "id": f"req-{d}",
            "done": True,
            "protocol": 1,
            "device": device,
            "count": len(expected),
            "complete": True,
        }
        assert [r["seq"] for r in records] == list(range(1, len(expected) + 1))
        assert all(r["id"] == f"req-{d}" and r["device"] == device for r in records)
        assert [(r["topic"], _payload_bytes(r), r["retain"]) for r in records] == [
            (m.topic, m.payload, m.retain) for m in expected
        ]
        assert all(r["qos"] == 1 for r in records)


def test_windows_filters_limit_and_order(broker: Broker, stored_fleet: Fleet) -> None:
    device = f"{stored_fleet.unique}-3"
    everything = _records(ask(broker, device))
    ts = [r["ts"] for r in everything]
    with StoreReader(stored_fleet.data) as reader:
        ns = [m.ts_ns for m in reader.messages(device)]
    assert [format_ts(t) for t in ns] == ts

    window = _records(ask(broker, device, {"since": ts[10], "until": ts[20]}))
    assert [r["ts"] for r in window] == ts[10:20], "since inclusive, until exclusive"
    # Epoch seconds as a JSON number: a double holds ~0.2 us here, so aim between two messages.
    between = (ns[9] + ns[10]) / 2 / NS_PER_S
    epoch = _records(ask(broker, device, {"since": between, "until": ts[20]}))
    assert [r["ts"] for r in epoch] == ts[10:20], "epoch seconds work as well"
    empty = ask(broker, device, {"since": ts[5], "until": ts[5]})
    assert empty == [{"done": True, "protocol": 1, "device": device, "count": 0, "complete": True}]

    status = _records(ask(broker, device, {"topic": "devices/+/status"}))
    assert status == [
        {**r, "seq": i} for i, r in enumerate((r for r in everything if "status" in r["topic"]), 1)
    ]
    newest = _records(ask(broker, device, {"order": "desc", "limit": 3}))
    assert [r["ts"] for r in newest] == ts[::-1][:3]
    assert [r["seq"] for r in newest] == [1, 2, 3]


def test_mqtt_311_requester_gets_the_default_response_topic_and_its_id(
    broker: Broker, stored_fleet: Fleet
) -> None:
    device = f"{stored_fleet.unique}-1"
    answers = ask(broker, device, {"id": "v311", "limit": 5}, mqtt5=False)
    assert len(answers) == 6
    assert all(a["id"] == "v311" for a in answers)
    assert answers[-1]["count"] == 5


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_cli_restore_writes_the_export_lines(
    broker: Broker, stored_fleet: Fleet, protocol: str
) -> None:
    device = f"{stored_fleet.unique}-2"
    # In this process, through the console script's error mapping; bytes as a pipe gets them.
    restored = CliRunner().invoke(
        app, ["restore", device, "--broker", broker.url, "--protocol", protocol]
    )
    assert restored.exit_code == 0, restored.stderr
    exported = CliRunner().invoke(
        app, ["export", "--data", str(stored_fleet.data), "--device", device]
    )
    assert exported.exit_code == 0, exported.stderr
    assert restored.stdout_bytes == exported.stdout_bytes, "restore and export write the same lines"
    assert restored.stdout_bytes.count(b"\n") == 200
    summary = restored.stderr.strip().splitlines()
    assert summary == [f"restored 200 messages of {device} (complete)"]
