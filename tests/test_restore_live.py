"""A running bridge restores through its own handles: fresh, exactly once, on a full disk.

Real Mosquitto, real bridges and RocksDB; `tests/faulty.py` injects the full disk.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_backup.config import Settings
from mqtt_backup.control import call
from mqtt_backup.keys import device_key
from mqtt_backup.placement import Weighted, place
from mqtt_backup.storage import Cursor, LiveReader
from tests.conftest import (
    BridgeThread,
    Broker,
    Sent,
    device_client,
    make_settings,
    publish,
    stored_count,
    wait_until,
)
from tests.faulty import Faults
from tests.test_restore_e2e import ask

pytestmark = pytest.mark.usefixtures("transport")
RunBridge = Callable[..., BridgeThread]


def _start(run_bridge: RunBridge, settings: Settings, **options: Any) -> BridgeThread:
    bridge = run_bridge(settings, **options)
    wait_until(bridge.bridge.restore_listening.is_set, 20, "the restore service to subscribe")
    return bridge


def _acknowledged(bridge: BridgeThread, count: int) -> bool:
    return bridge.bridge.snapshot().acknowledged >= count


def _payloads(answers: list[dict[str, Any]]) -> list[str]:
    return [str(a["payload"]) for a in answers[:-1]]


def test_the_first_answer_has_the_message_acknowledged_just_before(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    bridge = _start(run_bridge, make_settings(broker, data_dir))
    for i in range(3):
        publish(broker, [Sent(f"devices/{unique}/t", b"m%d" % i)])
        acked = functools.partial(_acknowledged, bridge, i + 1)
        wait_until(acked, 20, "the ack")
        answers = ask(broker, unique)  # at once: no catch-up, no wait
        assert _payloads(answers) == [f"m{j}" for j in range(i + 1)]
        assert answers[-1]["count"] == i + 1


def test_a_restore_during_a_full_disk_stall_answers_what_is_stored(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    faults = Faults()
    _start(run_bridge, make_settings(broker, data_dir), wrap_store=faults.wrap)
    publish(broker, [Sent(f"devices/{unique}/t", b"m%d" % i) for i in range(20)])
    wait_until(lambda: faults.written >= 20, 20, "the first messages stored")
    faults.failing = True
    publish(broker, [Sent(f"devices/{unique}/t", b"late%d" % i) for i in range(5)])
    wait_until(lambda: faults.calls["close_partitions"] >= 1, 20, "the failed write")
    held = ask(broker, unique)  # the writer's handles are closed: a read-only one serves
    assert _payloads(held) == [f"m{i}" for i in range(20)]
    assert held[-1]["count"] == 20
    faults.failing = False
    wait_until(lambda: faults.written >= 25, 30, "the held messages stored")
    after = ask(broker, unique)
    assert _payloads(after) == [f"m{i}" for i in range(20)] + [f"late{i}" for i in range(5)]


def _moving_device(unique: str, partitions: list[str], new: str) -> str:
    """A device that adding partition `new` moves onto it."""
    weighted = [Weighted(name, 1.0) for name in [*partitions, new]]
    return next(
        device
        for device in (f"{unique}-{i}" for i in range(1000))
        if place(device_key(device), weighted) == new
    )


async def _restore_racing(broker: Broker, device: str, move: Callable[[], object]) -> list[Any]:
    """Restore `device`; once its first message arrived, run `move` (in a thread) meanwhile.

    The move must be over before the terminal comes: the restore read on across it.
    """
    request_topic = f"backup/restore/{device}"
    listen = f"{request_topic}/{uuid.uuid4().hex}"
    answers: list[Any] = []
    moving: asyncio.Task[object] | None = None
    async with device_client(broker) as client:
        await client.subscribe(listen, qos=1)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = listen
        await client.publish(request_topic, b"", qos=1, properties=props)
        async with asyncio.timeout(60):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                answers.append(json.loads(message.payload))
                if moving is None:
                    moving = asyncio.create_task(asyncio.to_thread(move))
                if "done" in answers[-1] or "error" in answers[-1]:
                    assert moving.done(), "the move did not happen during the restore"
                    break
    assert moving is not None
    await moving
    return answers


@pytest.mark.parametrize("op", ["partitions-add", "partitions-remove"])
def test_a_restore_racing_a_partition_move_answers_every_message_once(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    op: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = LiveReader.read_rows

    def slow_read(self: LiveReader, cursor: Cursor, limit: int) -> list[tuple[bytes, bytes]]:
        time.sleep(0.3)  # a slow disk: the restore is still reading when the move is done
        return real(self, cursor, limit)

    monkeypatch.setattr(LiveReader, "read_rows", slow_read)
    _start(run_bridge, make_settings(broker, data_dir))
    device = _moving_device(unique, ["p0", "p1", "p2"], "p3")
    sent = [f"m{i}" for i in range(3000)]
    publish(broker, [Sent(f"devices/{device}/t", m.encode()) for m in sent])
    wait_until(lambda: stored_count(data_dir) >= len(sent), 60, "the history stored")
    if op == "partitions-remove":
        call(data_dir, "partitions-add", {"name": "p3"})  # the device lives on p3 now

    answers = asyncio.run(
        _restore_racing(broker, device, lambda: call(data_dir, op, {"name": "p3"}))
    )
    assert "done" in answers[-1], answers[-1]
    assert _payloads(answers) == sent
    assert answers[-1]["count"] == len(sent)
