"""End to end: a real Mosquitto, bridge and RocksDB; what is published is what is stored."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import mqtt5
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_backup import config
from mqtt_backup.bridge import GAP_LEAD_NS, Bridge
from mqtt_backup.errors import DataDirLocked
from mqtt_backup.mqtt import AsyncIngest, PahoIngest
from mqtt_backup.mqtt.async_ingest import _Wire
from mqtt_backup.storage import StoreReader
from mqtt_backup.storage.journal import BridgeState, GapLog
from tests.conftest import (
    BridgeThread,
    Broker,
    Sent,
    device_client,
    make_settings,
    publish,
    read_all,
    stored_count,
    wait_until,
)
from tests.faulty import Faults
from tools import devbroker

pytestmark = pytest.mark.usefixtures("transport")  # every test on both ingest transports

RunBridge = Callable[..., BridgeThread]
TEMPLATES = ("devices/{device}/#", "tele/{device}/+", "zigbee2mqtt/{device}")


def _fleet(unique: str, devices: int, per_device: int) -> list[Sent]:
    """A mixed fleet: three topic shapes, unicode ids, binary, empty and 256 KiB payloads."""
    rng = random.Random(7)
    messages = []
    for i in range(per_device):
        for d in range(devices):
            device = f"{unique}-dev{d}" if d % 5 else f"{unique}-Gerät-ü-{d}"
            shape = d % 3
            topic = (
                f"devices/{device}/telemetry/{i % 4}"
                if shape == 0
                else f"tele/{device}/SENSOR"
                if shape == 1
                else f"zigbee2mqtt/{device}"
            )
            kind = (i + d) % 50
            if kind == 0:
                payload = b""
            elif kind == 1:
                payload = rng.randbytes(256 * 1024)
            elif kind % 3 == 0:
                payload = rng.randbytes(rng.randint(1, 64)) + b"\xff\x00"
            else:
                payload = f'{{"seq": {i}, "device": "{device}", "t": 21.5}}'.encode()
            messages.append(Sent(topic, payload))
    return messages


def _by_device(messages: list[Sent]) -> dict[str, list[Sent]]:
    out: dict[str, list[Sent]] = {}
    for msg in messages:
        levels = msg.topic.split("/")
        out.setdefault(levels[1], []).append(msg)
    return out


def _assert_stored_exactly(data: Path, sent: list[Sent]) -> None:
    stored = read_all(data)
    expected = _by_device(sent)
    assert sorted(stored) == sorted(expected)
    for device, msgs in expected.items():
        got = [(m.record.topic, m.record.payload) for m in stored[device]]
        assert got == [(m.topic, m.payload) for m in msgs], f"{device}: order or content differs"


def _assert_stored_at_least_once(data: Path, sent: list[Sent]) -> None:
    """First copies are exactly what was sent, in order; extra copies are flagged redeliveries."""
    stored = read_all(data)
    for device, msgs in _by_device(sent).items():
        first = [(m.record.topic, m.record.payload) for m in stored[device] if not m.record.dup]
        again = {(m.record.topic, m.record.payload) for m in stored[device] if m.record.dup}
        expected = [(m.topic, m.payload) for m in msgs]
        assert [x for x in expected if x in set(first) | again] == expected, "lost messages"
        assert first == [x for x in expected if x in set(first)], "order differs"
        assert again <= set(expected)


# 20 each: every payload kind (empty, 256 KiB, binary, JSON) on every shape, 20 batches, 10 times
# the broker's window to the bridge. 100 each (5,000 messages, 25 MiB) in the full run: a
# size that flushes a records memtable mid-run (80 each did not, in a Store fed the
# same fleet in batches of 50), so that reads come from table files and memtables at once.
# The flush is storage's, under either transport: the full size runs on MQTT 5's default only.
@pytest.mark.parametrize(
    ("transport", "per_device"),
    [
        ("asyncio", 20),
        pytest.param("paho", 20, marks=pytest.mark.slow),
        pytest.param("asyncio", 100, marks=pytest.mark.slow),
    ],
    indirect=["transport"],
)
def test_fleet_of_50_devices_is_stored_once_byte_exact_in_order(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge, per_device: int
) -> None:
    settings = make_settings(broker, data_dir, topic=TEMPLATES)
    bridge = run_bridge(settings)
    sent = _fleet(unique, devices=50, per_device=per_device)
    total = 50 * per_device
    assert len(sent) == total
    assert len({m.payload for m in sent if len(m.payload) == 256 * 1024}) == total // 50
    publish(broker, sent)
    wait_until(lambda: stored_count(data_dir) >= total, 60, f"{total} stored messages")
    bridge.stop()
    _assert_stored_exactly(data_dir, sent)
    stored = read_all(data_dir)
    assert all(not m.record.dup and m.record.qos == 1 for ms in stored.values() for m in ms)
    assert bridge.bridge.pipeline.counters.stored == total
    # Each device lives in exactly one partition, and all three partitions got some.
    with StoreReader(data_dir) as reader:
        listed = reader.devices()
    assert len(listed) == 50
    assert {d.partition for d in listed} == {"p0", "p1", "p2"}


@pytest.mark.parametrize("transport", ["paho"], indirect=True)
def test_mqtt_311_bridge_stores_the_same(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    bridge = run_bridge(make_settings(broker, data_dir, protocol="3.1.1", topic=TEMPLATES))
    sent = _fleet(unique, devices=6, per_device=30)
    publish(broker, sent)
    wait_until(lambda: stored_count(data_dir) >= len(sent), 30, "stored messages")
    bridge.stop()
    _assert_stored_exactly(data_dir, sent)


def test_messages_published_while_the_bridge_is_down_arrive_after_restart(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    settings = make_settings(broker, data_dir)
    run_bridge(settings).stop()  # creates the persistent session and its subscription
    sent = [Sent(f"devices/{unique}-{i % 7}/t", f"offline {i}".encode()) for i in range(700)]
    publish(broker, sent)
    bridge = run_bridge(settings)
    wait_until(lambda: stored_count(data_dir) >= 700, 30, "queued messages")
    bridge.stop()
    _assert_stored_exactly(data_dir, sent)
    assert GapLog(data_dir).all() == [], "the session survived: no gap"


def test_own_namespace_and_unmatched_topics_are_not_stored(
    own_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    # `{device}/#` would match the bridge's own `backup/...` topics: they must still be skipped.
    # Its own broker: `{device}/#` takes every retained message of the shared one (other tests'
    # bridges leave their retained status under their own namespaces, as they should).
    broker = own_broker
    bridge = run_bridge(make_settings(broker, data_dir, topic=("{device}/#",)))
    publish(
        broker,
        [
            Sent(f"backup/restore/{unique}", b"{}"),
            Sent(f"backup/restore/{unique}/response", b'{"done": true}'),
            Sent(f"backup/status/{unique}", b"online"),
            Sent(f"{unique}/temp", b"21"),
        ],
    )
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "the device message")
    bridge.stop()
    stored = read_all(data_dir)
    assert list(stored) == [unique]
    assert bridge.bridge.pipeline.counters.skipped >= 3


@pytest.mark.parametrize(
    ("protocol", "transport"),
    [("5", "asyncio"), ("5", "paho"), ("3.1.1", "paho")],
    indirect=["transport"],
)
def test_retained_messages_are_not_stored_again_on_restart(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge, protocol: str
) -> None:
    topic = f"devices/{unique}/state"
    publish(broker, [Sent(topic, b"on", retain=True)])
    settings = make_settings(broker, data_dir, protocol=protocol)
    first = run_bridge(settings)
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "the retained message")
    first.stop()
    second = run_bridge(settings)
    publish(broker, [Sent(topic, b"off")])
    wait_until(lambda: stored_count(data_dir) >= 2, 20, "the live message")
    second.stop()
    stored = read_all(data_dir)[unique]
    assert [(m.record.payload, m.record.retain) for m in stored] == [(b"on", True), (b"off", False)]
    publish(broker, [Sent(topic, b"", retain=True)])  # clear the retained value


def test_lost_broker_session_is_recorded_as_a_gap(
    own_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    settings = make_settings(own_broker, data_dir)
    first = run_bridge(settings)
    first.stop()
    caught_up = first.bridge.pipeline.caught_up_ns
    own_broker.wipe()  # the broker forgets the bridge's session and queue
    own_broker.start()
    bridge = run_bridge(settings)
    publish(own_broker, [Sent(f"devices/{unique}/t", b"1")])
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "a message after the new session")
    bridge.stop()
    gaps = GapLog(data_dir).all()
    assert [g.reason for g in gaps] == ["session-lost"]
    assert gaps[0].since_ns < gaps[0].until_ns
    # From a second before the last caught-up moment: a message published just before it may
    # still have been inside the broker, and went with the session.
    assert caught_up is not None
    assert gaps[0].since_ns == caught_up - GAP_LEAD_NS


def test_the_subscriptions_are_on_disk_before_anything_is_stored(
    broker: Broker, data_dir: Path, unique: str
) -> None:
    """A start that finds no session records a gap only if the state file says there was one.

    So new (or changed) subscriptions are saved at connect, before a message can be stored and
    acknowledged (a kill -9 right after must not lose the next gap). A restart with the same
    ones leaves the file to the first tick, off the way to the first commit.
    """

    def connected(settings: config.Settings) -> Bridge:
        bridge = Bridge(settings)
        bridge.connect()
        return bridge

    def stopped(bridge: Bridge) -> None:
        bridge.stop()
        bridge.run()  # stopped before it runs: shuts down in order at once

    state = data_dir / "state.json"
    first = connected(make_settings(broker, data_dir))
    assert BridgeState.load(data_dir).subscriptions == ["devices/+/#"]
    stopped(first)
    changed = connected(make_settings(broker, data_dir, topic=(f"tele/{{device}}/{unique}",)))
    assert BridgeState.load(data_dir).subscriptions == [f"tele/+/{unique}"]
    stopped(changed)
    before = state.stat().st_mtime_ns
    again = connected(make_settings(broker, data_dir, topic=(f"tele/{{device}}/{unique}",)))
    assert state.stat().st_mtime_ns == before, "nothing new to save before the first commit"
    thread = threading.Thread(target=again.run, name="bridge")
    thread.start()
    try:
        wait_until(lambda: state.stat().st_mtime_ns != before, 10, "the first tick's save")
    finally:
        again.stop()
        thread.join(30)
    assert BridgeState.load(data_dir).subscriptions == [f"tele/+/{unique}"]


def test_bridge_reconnects_after_a_broker_restart(
    own_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    bridge = run_bridge(make_settings(own_broker, data_dir))
    before = [Sent(f"devices/{unique}/t", f"before {i}".encode()) for i in range(50)]
    publish(own_broker, before)
    wait_until(lambda: stored_count(data_dir) >= 50, 20, "messages before the restart")
    own_broker.stop()
    own_broker.start()
    after = [Sent(f"devices/{unique}/t", f"after {i}".encode()) for i in range(50)]
    wait_until(lambda: bridge.bridge._transport.connected, 30, "the bridge to reconnect")
    publish(own_broker, after)
    wait_until(lambda: stored_count(data_dir) >= 100, 30, "messages after the restart")
    bridge.stop()
    # An ack in flight when the broker went down makes it redeliver: a flagged second copy.
    _assert_stored_at_least_once(data_dir, before + after)
    assert GapLog(data_dir).all() == [], "broker persistence kept the session"


def test_storage_failure_withholds_acks_and_recovers_by_itself(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
) -> None:
    settings = make_settings(broker, data_dir)
    run_bridge(settings).stop()  # create the store and the session without faults
    faults = Faults(failing=True)  # one disk, full for both bridges below
    bridge = run_bridge(settings, wrap_store=faults.wrap)
    sent = [Sent(f"devices/{unique}-{i % 3}/t", f"m{i}".encode()) for i in range(120)]
    publish(broker, sent)
    wait_until(lambda: bridge.bridge.pipeline.pending > 0, 20, "the bridge to hold messages")
    assert stored_count(data_dir) == 0
    # Stopping while storage fails must not acknowledge: a new bridge gets everything again.
    bridge.stop()
    restarted = run_bridge(settings, wrap_store=faults.wrap)
    wait_until(lambda: restarted.bridge.pipeline.pending > 0, 20, "redelivered messages")
    faults.failing = False  # the disk has room again: the bridge resumes by itself
    wait_until(lambda: stored_count(data_dir) >= 120, 40, "all messages after recovery")
    restarted.stop()
    stored = read_all(data_dir)
    payloads = Counter(m.record.payload for ms in stored.values() for m in ms)
    assert set(payloads) == {m.payload for m in sent}
    assert all(count == 1 for count in payloads.values()), "stored once each after recovery"


def test_data_dir_is_single_writer(broker: Broker, data_dir: Path, run_bridge: RunBridge) -> None:
    run_bridge(make_settings(broker, data_dir))
    with pytest.raises(DataDirLocked, match=str(os.getpid())):
        run_bridge(make_settings(broker, data_dir))


def test_crash_between_sync_and_ack_stores_flagged_duplicates(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
) -> None:
    settings = make_settings(broker, data_dir)
    # The first bridge syncs but "dies" before its acks leave: they are never sent.
    kind = AsyncIngest if transport == "asyncio" else PahoIngest
    monkeypatch.setattr(kind, "ack", lambda _self, _tokens: None)
    first = run_bridge(settings)
    sent = [Sent(f"devices/{unique}/t", f"m{i}".encode()) for i in range(20)]
    publish(broker, sent)
    wait_until(lambda: stored_count(data_dir) >= 20, 20, "the first copies")
    first.stop()
    monkeypatch.undo()
    second = run_bridge(settings)
    wait_until(lambda: stored_count(data_dir) >= 40, 20, "the redelivered copies")
    second.stop()
    stored = read_all(data_dir)[unique]
    assert [m.record.payload for m in stored if not m.record.dup] == [m.payload for m in sent]
    assert [m.record.payload for m in stored if m.record.dup] == [m.payload for m in sent]
    with StoreReader(data_dir) as reader:
        info = reader.device(unique)
    assert info is not None
    assert (info.count, info.dups) == (40, 20)
    assert second.bridge.pipeline.counters.duplicates == 20


def test_metrics_endpoint_reports_the_bridge(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    port = devbroker.free_port()
    bridge = run_bridge(make_settings(broker, data_dir, metrics_port=port))
    publish(broker, [Sent(f"devices/{unique}/t", b"x" * 10) for _ in range(7)])
    wait_until(lambda: stored_count(data_dir) >= 7, 20, "stored messages")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    bridge.stop()
    values = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("mqtt_backup_")
    )
    assert float(values["mqtt_backup_messages_stored_total"]) == 7
    assert float(values["mqtt_backup_payload_bytes_total"]) == 70
    assert float(values["mqtt_backup_connected"]) == 1
    assert float(values["mqtt_backup_storage_stalled"]) == 0
    assert float(values["mqtt_backup_pending_messages"]) == 0


def _count_pongs(bridge: BridgeThread, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list that gets an entry for every PINGRESP the bridge's transport reads from now on."""
    pongs: list[str] = []
    transport = bridge.bridge._transport
    if isinstance(transport, PahoIngest):
        transport._client.on_log = lambda _c, _u, _level, text: (
            pongs.append(text) if text == "Received PINGRESP" else None
        )
        return pongs
    dispatch = _Wire._dispatch

    def spy(wire: _Wire, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.PingRespPacket):
            pongs.append("PINGRESP")
        dispatch(wire, packet)

    monkeypatch.setattr(_Wire, "_dispatch", spy)
    return pongs


def test_a_long_storage_stall_holds_one_window_and_stays_connected(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # keepalive 2 s (below the CLI's minimum of 5): the same property in a fraction of the time
    # (at 1 s a loaded machine sometimes starved paho's thread past Mosquitto's 1.5 keepalives).
    settings = make_settings(broker, data_dir, keepalive=2)
    run_bridge(settings).stop()
    faults = Faults(failing=True)
    bridge = run_bridge(settings, wrap_store=faults.wrap)
    disconnects: list[str] = []
    real_disconnected = bridge.bridge.disconnected
    monkeypatch.setattr(bridge.bridge, "disconnected", disconnects.append)
    pongs = _count_pongs(bridge, monkeypatch)
    sent = [Sent(f"devices/{unique}/t", b"s%d" % i) for i in range(300)]
    publish(broker, sent)
    receive_maximum = max(settings.batch_max, 100)
    pipeline = bridge.bridge.pipeline
    wait_until(lambda: pipeline.pending == receive_maximum, 20, "a full window held")
    pongs.clear()
    # Three keepalive rounds while storage fails: longer than the 1.5 keepalives after which
    # Mosquitto drops a silent client, and than the 2 after which paho gives up on a PINGRESP.
    wait_until(lambda: len(pongs) >= 3, 20, "three pings answered during the stall")
    assert faults.failing
    assert faults.calls["write_failed"] >= 2, "storage was retried, and failed, meanwhile"
    assert disconnects == [], "reading goes on during a stall, so keepalive holds"
    assert pipeline.pending == receive_maximum, "the broker's window bounds what is held"
    monkeypatch.setattr(bridge.bridge, "disconnected", real_disconnected)
    faults.failing = False
    wait_until(lambda: stored_count(data_dir) >= 300, 40, "every message after recovery")
    bridge.stop()
    stored = read_all(data_dir)[unique]
    assert sorted(m.record.payload for m in stored) == sorted(m.payload for m in sent)
    assert not any(m.record.dup for m in stored), "no copies were multiplied"


def _publish_expiring(broker: Broker, messages: list[Sent], expiry_s: int | None) -> None:
    """Publish at QoS 1 with an MQTT 5 Message Expiry Interval (None: the message never expires)."""

    async def run() -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        async with device_client(broker) as client:
            for msg in messages:
                await client.publish(msg.topic, msg.payload, qos=1, properties=props)

    asyncio.run(run())


@pytest.mark.parametrize("expiry_s", [2, None], ids=["expired-meanwhile", "redelivered"])
def test_held_messages_survive_a_broker_restart_during_a_stall(
    own_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge, expiry_s: int | None
) -> None:
    """The broker does not resend what expired while it was away: the held copies are all there is.

    Without expiry it does resend them (DUP set): both copies are stored, the resent one flagged.
    """
    settings = make_settings(own_broker, data_dir)
    run_bridge(settings).stop()  # the session and its subscription, without faults
    faults = Faults(failing=True)
    bridge = run_bridge(settings, wrap_store=faults.wrap)
    sent = [Sent(f"devices/{unique}-{i % 3}/t", b"h%d" % i) for i in range(60)]
    _publish_expiring(own_broker, sent, expiry_s)
    published = time.monotonic()
    pipeline = bridge.bridge.pipeline
    wait_until(lambda: pipeline.pending == len(sent), 20, "the bridge to hold every message")
    own_broker.stop()
    wait_until(lambda: not bridge.bridge._transport.connected, 20, "the bridge to see it")
    # Mosquitto counts expiry in whole seconds: let every message expire while the broker is down.
    time.sleep(max(0.0, published + (expiry_s or 0) + 1.2 - time.monotonic()))
    own_broker.start()
    wait_until(lambda: bridge.bridge._transport.connected, 30, "the bridge to reconnect")
    # Held copies stay, and the broker's resent ones (if any) are one more window at most.
    assert len(sent) <= pipeline.pending <= 2 * len(sent)
    faults.failing = False
    wait_until(lambda: pipeline.pending == 0, 40, "the held messages to be stored")
    bridge.stop()
    stored = read_all(data_dir)
    payloads = Counter(m.record.payload for ms in stored.values() for m in ms)
    assert set(payloads) == {m.payload for m in sent}, "lost messages"
    first = [m.record.payload for ms in stored.values() for m in ms if not m.record.dup]
    assert sorted(first) == sorted(m.payload for m in sent), "one unflagged copy each"
    if expiry_s is None:
        assert all(count == 2 for count in payloads.values()), "the broker resent every one"
