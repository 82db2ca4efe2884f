"""Restore over MQTT against a real broker and a real bridge (DESIGN.md section 4)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_backup.config import Settings
from mqtt_backup.records import Record
from mqtt_backup.restore import reply as reply_module
from mqtt_backup.restore import service as restore_module
from mqtt_backup.storage import Cursor, LiveReader, Pending, Store, StoreReader
from mqtt_backup.times import format_ts
from tests.conftest import (
    REPO,
    BridgeThread,
    Broker,
    Sent,
    device_client,
    make_settings,
    publish,
    publish_async,
    read_all,
    stored_count,
    wait_until,
)
from tests.test_cli_errors import Ran
from tests.test_cli_errors import cli as run_cli

RunBridge = Callable[[Settings], BridgeThread]
Message = dict[str, Any]


def _start(run_bridge: RunBridge, settings: Settings) -> BridgeThread:
    bridge = run_bridge(settings)
    wait_until(bridge.bridge.restore_listening.is_set, 20, "the restore service to subscribe")
    return bridge


async def _ask(
    broker: Broker,
    device: str,
    request: Any = None,
    *,
    mqtt5: bool = True,
    raw_payload: bytes | None = None,
    timeout: float = 20,
) -> list[Message]:
    """Send one request as a plain MQTT client and collect the answer up to its terminal."""
    request_topic = f"backup/restore/{device}"
    protocol = aiomqtt.ProtocolVersion.V5 if mqtt5 else aiomqtt.ProtocolVersion.V311
    listen = f"{request_topic}/{uuid.uuid4().hex}" if mqtt5 else f"{request_topic}/response"
    payload = raw_payload if raw_payload is not None else _payload(request)
    answers: list[Message] = []
    async with device_client(broker, protocol=protocol) as client:
        await client.subscribe(listen, qos=1)
        props = None
        if mqtt5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = listen
            props.CorrelationData = b"corr-" + device.encode()
        await client.publish(request_topic, payload, qos=1, properties=props)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                body = json.loads(message.payload)
                if mqtt5:
                    correlation = getattr(message.properties, "CorrelationData", None)
                    assert correlation == b"corr-" + device.encode(), "correlation data echoed"
                answers.append(body)
                if "done" in body or "error" in body:
                    return answers
    return answers


def _payload(request: Any) -> bytes:
    return b"" if request is None else json.dumps(request).encode()


def ask(broker: Broker, device: str, request: Any = None, **options: Any) -> list[Message]:
    """Synchronous _ask."""
    return asyncio.run(_ask(broker, device, request, **options))


def _records(answers: list[Message]) -> list[Message]:
    return answers[:-1]


def _payload_bytes(envelope: Message) -> bytes:
    if envelope["encoding"] == "base64":
        return base64.b64decode(envelope["payload"])
    return str(envelope["payload"]).encode()


@pytest.fixture
def retained(broker: Broker) -> Iterator[list[str]]:
    """Topics where the test leaves a retained message: cleared after it, for the next bridges."""
    topics: list[str] = []
    yield topics
    publish(broker, [Sent(topic, b"", retain=True) for topic in topics])


def test_replay_republishes_at_the_rate_and_is_not_stored_again(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    monkeypatch: pytest.MonkeyPatch,
    retained: list[str],
) -> None:
    bridge = _start(run_bridge, make_settings(broker, data_dir))
    device = f"{unique}-replay"
    sent = [Sent(f"devices/{device}/t", f"r{i}".encode(), retain=i == 0) for i in range(30)]
    retained.append(sent[0].topic)
    publish(broker, sent)
    wait_until(lambda: stored_count(data_dir) >= 30, 20, "stored messages")

    # The pacer's timing is checked on a fake clock in test_restore_unit; here: the bridge paces
    # this replay, at the rate the request asked for.
    pacers: list[reply_module.Pacer] = []
    real_pacer = reply_module.Pacer

    def recorded(rate: float | None) -> reply_module.Pacer:
        pacers.append(real_pacer(rate))
        return pacers[-1]

    monkeypatch.setattr(restore_module, "Pacer", recorded)

    async def scenario() -> tuple[list[aiomqtt.Message], list[Message]]:
        arrived: list[aiomqtt.Message] = []
        async with device_client(broker) as watcher:
            await watcher.subscribe(f"devices/{device}/#", qos=1)

            async def collect() -> None:
                async for message in watcher.messages:
                    if message.retain:
                        continue  # the retained value the subscription itself brings
                    if message.payload == b"marker":
                        return
                    arrived.append(message)

            collector = asyncio.create_task(collect())
            answers = await _ask(broker, device, {"mode": "replay", "rate": 100})
            # The terminal follows the broker's PUBACK of every replay, so the broker queued each
            # replay to every subscriber (this watcher, the bridge's ingest) before this marker.
            await publish_async(broker, [Sent(f"devices/{device}/t", b"marker")])
            await asyncio.wait_for(collector, 20)
        return arrived, answers

    arrived, answers = asyncio.run(scenario())
    assert answers == [
        {"done": True, "protocol": 1, "device": device, "count": 30, "complete": True}
    ]
    assert [m.payload for m in arrived] == [m.payload for m in sent]
    assert all(m.retain is False for m in arrived), "replays never overwrite retained values"
    users = [dict(getattr(m.properties, "UserProperty", [])) for m in arrived]
    assert all(u.get("mqtt-backup-replay") == "1" and "mqtt-backup-ts" in u for u in users)
    assert [p.rate for p in pacers] == [100]
    # Ingest got the replays before the marker: once the marker is stored, the replays were seen.
    wait_until(lambda: stored_count(data_dir) >= 31, 20, "the marker after the replays")
    assert [m.record.payload for m in read_all(data_dir)[device]] == [
        *(m.payload for m in sent),
        b"marker",
    ], "the replays were not stored again"
    assert bridge.bridge.pipeline.counters.skipped >= 30


def test_a_replay_of_qos0_history_completes_and_leaves_the_window_whole(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    # A replay keeps the stored QoS: a QoS 0 message gets no PUBACK. It used to take a credit
    # of the window that all restores share and never give it back: no terminal, ever.
    _start(run_bridge, make_settings(broker, data_dir))
    device = f"{unique}-qos0"
    sent = [Sent(f"devices/{device}/t", b"q%d" % i, qos=int(i % 3 == 0)) for i in range(30)]
    publish(broker, sent)
    wait_until(lambda: stored_count(data_dir) >= 30, 20, "stored messages")
    assert [m.record.qos for m in read_all(data_dir)[device]] == [m.qos for m in sent]

    async def scenario() -> tuple[list[aiomqtt.Message], list[Message], list[Message]]:
        arrived: list[aiomqtt.Message] = []
        async with device_client(broker) as watcher:
            await watcher.subscribe(f"devices/{device}/#", qos=1)

            async def collect() -> None:
                async for message in watcher.messages:
                    arrived.append(message)
                    if len(arrived) == len(sent):
                        return

            collector = asyncio.create_task(collect())
            replay = await _ask(broker, device, {"mode": "replay"})
            await asyncio.wait_for(collector, 20)
        # The same bridge answers the next restore: the window is whole again.
        return arrived, replay, await _ask(broker, device)

    arrived, replay, after = asyncio.run(scenario())
    done = {"done": True, "protocol": 1, "device": device, "count": 30, "complete": True}
    assert replay == [done]
    assert [m.payload for m in arrived] == [m.payload for m in sent]
    assert [m.qos for m in arrived] == [m.qos for m in sent]
    assert after[-1] == done
    assert [_payload_bytes(m) for m in _records(after)] == [m.payload for m in sent]


BAD_REQUESTS: list[tuple[bytes, str]] = [
    (b"{", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"everything"', "JSON object"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b'{"limit": NaN}', "NaN"),
    (b'{"since": Infinity}', "Infinity"),
    (b'{"limt": 5}', "'limt'"),
    (b'{"limit": 0}', "'limit'"),
    (b'{"limit": "5"}', "'limit'"),
    (b'{"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"}', "after"),
    (b'{"since": "yesterday"}', "RFC 3339"),
    (b'{"topic": "a/#/b"}', "wildcard"),
    (b'{"order": "newest"}', "'order'"),
    (b'{"mode": "copy"}', "'mode'"),
    (b'{"rate": 0, "mode": "replay"}', "'rate'"),
    (b'{"id": 5}', "'id'"),
    (b"\xff\xfe", "UTF-8"),
    (b'{"x": "' + b"a" * 70_000 + b'"}', "64"),
]


def test_every_bad_request_gets_one_error_and_ingest_goes_on(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    _start(run_bridge, make_settings(broker, data_dir))
    device = f"{unique}-bad"
    for payload, words in BAD_REQUESTS:
        answers = ask(broker, device, raw_payload=payload)
        assert len(answers) == 1, answers
        assert set(answers[0]) == {"error", "protocol"}, answers[0]
        assert words in answers[0]["error"], (payload[:40], answers[0])
    answers = ask(broker, device, {"id": "keep-me", "limt": 1})
    assert answers == [{"id": "keep-me", "error": answers[0]["error"], "protocol": 1}], "id echoed"
    publish(broker, [Sent(f"devices/{device}/t", b"still here")])
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "ingest after bad requests")
    assert ask(broker, device)[-1]["count"] == 1


def test_response_topic_refusal_goes_to_the_default_topic(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    _start(run_bridge, make_settings(broker, data_dir))
    device = f"{unique}-rt"

    async def scenario() -> list[Message]:
        async with device_client(broker) as client:
            await client.subscribe(f"backup/restore/{device}/response", qos=1)
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = f"backup/restore/{device}"  # would look like a request
            await client.publish(f"backup/restore/{device}", b"", qos=1, properties=props)
            async with asyncio.timeout(10):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    return [json.loads(message.payload)]
        return []

    answers = asyncio.run(scenario())
    assert "must lie under backup/restore/<device>/" in answers[0]["error"]


def test_unknown_device_is_done_with_zero(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    _start(run_bridge, make_settings(broker, data_dir))
    answers = ask(broker, f"{unique}-nobody", {"id": "n"})
    assert answers == [
        {
            "id": "n",
            "done": True,
            "protocol": 1,
            "device": f"{unique}-nobody",
            "count": 0,
            "complete": True,
        }
    ]


def test_retained_requests_are_ignored(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    device = f"{unique}-ret"
    request_topic = f"backup/restore/{device}"
    publish(broker, [Sent(request_topic, b'{"id": "stale"}', retain=True)])

    async def scenario() -> list[Message]:
        got: list[Message] = []
        async with device_client(broker) as client:
            # Listening before the bridge starts: an answer at its subscribe would be heard too.
            await client.subscribe(f"{request_topic}/response", qos=1)
            await asyncio.to_thread(_start, run_bridge, make_settings(broker, data_dir))
            # The service gets the retained request at its subscribe, before this live one: a
            # (wrong) answer to it would come before this one's terminal.
            await client.publish(request_topic, b'{"id": "marker"}', qos=1)
            async with asyncio.timeout(20):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    got.append(json.loads(message.payload))
                    if got[-1].get("id") == "marker":
                        break
        return got

    try:
        assert asyncio.run(scenario()) == [
            {
                "id": "marker",
                "done": True,
                "protocol": 1,
                "device": device,
                "count": 0,
                "complete": True,
            }
        ]
    finally:
        publish(broker, [Sent(request_topic, b"", retain=True)])


def test_a_lost_session_makes_the_restore_incomplete(
    own_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    settings = make_settings(own_broker, data_dir)
    device = f"{unique}-gap"
    first = _start(run_bridge, settings)
    publish(own_broker, [Sent(f"devices/{device}/t", b"before")])
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "the first message")
    first.stop()
    own_broker.wipe()  # a new broker: the bridge's session and queue are gone
    own_broker.start()
    _start(run_bridge, settings)
    publish(own_broker, [Sent(f"devices/{device}/t", b"after")])
    wait_until(lambda: stored_count(data_dir) >= 2, 20, "the second message")
    done = ask(own_broker, device)[-1]
    assert done["count"] == 2
    assert done["complete"] is False
    assert [g["reason"] for g in done["gaps"]] == ["session-lost"]
    # A window after the gap is complete again.
    after = read_all(data_dir)[device][-1].ts_ns
    assert ask(own_broker, device, {"since": format_ts(after)})[-1]["complete"] is True


def test_cli_exit_codes(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge, tmp_path: Path
) -> None:
    # In this process, through the console script's error mapping (Root.main): the exit code
    # and stderr line a shell sees (test_cli_subprocess starts the real process).
    def cli(*args: str, url: str = broker.url) -> Ran:
        return run_cli("restore", *args, "--broker", url, cwd=tmp_path)

    silent = cli(f"{unique}-x", "--timeout", "1")
    assert silent.returncode == 3, silent.stderr
    assert silent.stderr.startswith("mqtt-backup: no bridge answered")
    _start(run_bridge, make_settings(broker, data_dir, protocol="3.1.1"))
    refused = cli(f"{unique}-x", "--replay")
    assert refused.returncode == 1, refused.stderr
    assert "replay and raw format need the bridge to use MQTT 5" in refused.stderr
    assert cli("a/b").returncode == 2
    assert cli(f"{unique}-x", "--since", "garbage").returncode == 2


def test_a_restore_nobody_answers_names_the_bridges_the_status_topic_shows_offline(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    # Before: "no bridge answered: nothing on ... for 1 s", though the status topic said the
    # only bridge had stopped; the user was sent to check the connection.
    ns = f"ns{unique}"
    offline = json.dumps({"state": "offline", "protocol": 1, "client_id": "b1"}).encode()
    publish(broker, [Sent(f"{ns}/status/default/b1", offline, retain=True)])
    try:
        silent = run_cli(
            "restore",
            "d1",
            "--timeout",
            "1",
            "--namespace",
            ns,
            "--broker",
            broker.url,
            cwd=tmp_path,
        )
    finally:
        publish(broker, [Sent(f"{ns}/status/default/b1", b"", retain=True)])
    assert silent.returncode == 3, silent.stderr
    said = silent.stderr.strip()
    assert said.startswith(f"mqtt-backup: no bridge answered: nothing on {ns}/restore/d1/"), said
    assert said.endswith(
        " for 1 s; the status topic shows 1 bridge, all offline (default/b1). Try: start the "
        "bridge ('mqtt-backup run'), or check that it reaches this broker"
    ), said


@pytest.mark.parametrize("count", [1, 2])
def test_cli_replay_summary_says_replayed(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    tmp_path: Path,
    count: int,
) -> None:
    # Found by a new user: a replay's summary said "restored", and "1 messages".
    device = f"{unique}-again"
    _fill_store(data_dir, device, count)
    _start(run_bridge, make_settings(broker, data_dir))
    done = run_cli("restore", device, "--replay", "--broker", broker.url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    noun = "message" if count == 1 else "messages"
    assert done.stderr.startswith(f"replayed {count} {noun} of {device} "), done.stderr
    assert "restored" not in done.stderr


def _fill_store(data: Path, device: str, count: int) -> None:
    store = Store.open(data, partitions=3)
    try:
        partition, dev_key = store.locate(device)
        now = time.time_ns()
        for start in range(0, count, 10_000):
            store.write(
                partition,
                [
                    Pending(device, dev_key, now + i, Record(f"devices/{device}/t", b"%d" % i))
                    for i in range(start, min(start + 10_000, count))
                ],
            )
    finally:
        store.close()


def _wait_stored(data: Path, device: str, count: int, what: str) -> None:
    """Wait until the index says `count` messages of `device` are stored."""

    def stored() -> int:
        with StoreReader(data) as reader:
            return sum(d.count for d in reader.devices() if d.device == device)

    wait_until(lambda: stored() >= count, 60, what)


def test_a_big_restore_does_not_stall_ingest(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device, total, rounds, burst = f"{unique}-big", 4_000, 8, 25
    live = f"{unique}-live"
    _fill_store(data_dir, device, total)  # how it got there does not matter here
    _start(run_bridge, make_settings(broker, data_dir))
    # A slow disk under the restore: at each of `rounds` points of its scan, the read blocks
    # (as a RocksDB read does) until ingest has stored one more burst of live messages. So the
    # restore can only finish if ingest stores and acknowledges while it streams: 8 bursts of
    # 25 are twice the broker's window of 100 unacknowledged messages to the bridge.
    streaming = threading.Event()
    confirmed: list[int] = []  # bursts the test saw stored
    waited: list[tuple[int, bool]] = []  # (point, whether ingest got there in time)
    real_read = LiveReader.read_rows
    step = total // rounds
    read_so_far: dict[int, int] = {}  # messages each restore (cursor) has read

    def slow_read(self: LiveReader, cursor: Cursor, limit: int) -> list[tuple[bytes, bytes]]:
        found = real_read(self, cursor, limit)
        if cursor.device == device:
            before = read_so_far.get(id(cursor), 0)
            read_so_far[id(cursor)] = before + len(found)
            for point in range(before // step + 1, (before + len(found)) // step + 1):
                deadline = time.monotonic() + 60
                while len(confirmed) < point and time.monotonic() < deadline:
                    time.sleep(0.005)  # the slow read: blocking, as in a worker thread
                waited.append((point, len(confirmed) >= point))
            streaming.set()
        return found

    monkeypatch.setattr(LiveReader, "read_rows", slow_read)
    answers: list[list[Message]] = []
    asker = threading.Thread(
        target=lambda: answers.append(ask(broker, device, {"id": "big"}, timeout=120))
    )
    asker.start()
    wait_until(streaming.is_set, 60, "the restore to stream")
    for k in range(1, rounds + 1):
        publish(broker, [Sent(f"devices/{live}/t", b"%d-%d" % (k, i)) for i in range(burst)])
        _wait_stored(data_dir, live, k * burst, f"live burst {k}, while the restore streams")
        confirmed.append(k)
    asker.join(120)
    assert answers, "the restore answered"
    assert answers[0][-1] == {
        "id": "big",
        "done": True,
        "protocol": 1,
        "device": device,
        "count": total,
        "complete": True,
    }
    assert [r["seq"] for r in _records(answers[0])] == list(range(1, total + 1))
    # Every burst was stored after the restore began and before it read past its point.
    assert waited == [(point, True) for point in range(1, rounds + 1)]
    with StoreReader(data_dir) as reader:
        stored = [m.record.payload for m in reader.messages(live)]
    assert stored == [b"%d-%d" % (k, i) for k in range(1, rounds + 1) for i in range(burst)]


def _slow_reader(stream: IO[bytes], chunk: int, pause_s: float) -> bytes:
    """Read a pipe the way a slow consumer does (a slow disk, `| gzip` on a busy machine)."""
    parts = []
    while block := stream.read(chunk):
        parts.append(block)
        time.sleep(pause_s)  # the slowness under test, not a wait for a condition
    return b"".join(parts)


@pytest.mark.slow
def test_cli_restore_to_a_slow_consumer_is_complete_and_in_order(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    # The old client acknowledged on arrival and queued in memory; past 10,000 queued it dropped
    # lines silently (and often the terminal). Now a line is acknowledged only once written.
    device, total = f"{unique}-slow", 30_000
    _fill_store(data_dir, device, total)
    _start(run_bridge, make_settings(broker, data_dir))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqtt_backup", "restore", device, "--broker", broker.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    restored = _slow_reader(proc.stdout, 4096, 0.01)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    export = [sys.executable, "-m", "mqtt_backup", "export", "--data", str(data_dir)]
    exported = subprocess.run(
        [*export, "--device", device],
        capture_output=True,
        cwd=REPO,
        timeout=120,
        check=True,
    )
    assert restored.count(b"\n") == total
    assert restored == exported.stdout, "every line, in stored order"
    assert stderr.strip().splitlines() == [f"restored {total} messages of {device} (complete)"]
