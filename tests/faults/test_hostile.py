"""Hostile input: malformed and flooding restore requests beside a running ingest, and hostile
messages to store (empty, maximum size, invalid UTF-8, topics at the length limit)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_backup.config import BrokerTarget, parse_broker_url
from mqtt_backup.restore.client import Ask, ask, request_for
from tests.conftest import BridgeThread, Broker, make_settings, wait_until
from tests.faults.conftest import BrokerFactory, Report
from tests.faults.harness import (
    RATE,
    Publisher,
    assert_nothing_lost,
    bridge_process,
    cli,
    fleet,
    read_back,
    size,
    stored_total,
)

pytestmark = pytest.mark.slow
RunBridge = Callable[..., BridgeThread]
PREFIX = "backup/restore"


def _malformed(device: str) -> list[bytes]:
    """Request payloads the bridge must refuse with an error terminal, one each."""
    return [
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'"everything"',
        b"{",
        b"{" + b" " * (64 * 1024) + b"}",
        b"[" * 5000 + b"]" * 5000,
        b'{"limt": 5}',
        b'{"since": "yesterday"}',
        b'{"since": 5, "until": 1}',
        b'{"limit": 0}',
        b'{"limit": -1}',
        b'{"limit": 1e400}',
        b'{"limit": true}',
        b'{"order": "sideways"}',
        b'{"mode": "replay", "rate": 0}',
        b'{"mode": "replay", "rate": NaN}',
        b'{"rate": Infinity, "mode": "replay"}',
        b'{"topic": "a/#/b"}',
        b'{"format": "xml"}',
        b'{"id": 5}',
        json.dumps({"id": "x" * 5000}).encode(),
        b'{"limit": 1, "limit": 2}',
        b'{"group": 7}',
        json.dumps({"since": "2026-13-45T99:00:00Z", "device": device}).encode(),
    ]


@dataclass
class Listener:
    """Every answer on the restore namespace's response topics (requests themselves skipped)."""

    answers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def terminals(self, topic_prefix: str) -> list[dict[str, Any]]:
        """Terminal messages that arrived below a topic."""
        return [
            body
            for topic, body in self.answers
            if topic.startswith(topic_prefix) and ("done" in body or "error" in body)
        ]


async def _listen(client: aiomqtt.Client, into: Listener) -> None:
    async for message in client.messages:
        topic = str(message.topic)
        if topic.count("/") < 3 or not isinstance(message.payload, bytes):
            continue  # a request, not an answer
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = {"unparsed": True}
        into.answers.append((topic, body if isinstance(body, dict) else {"other": body}))


def _props(response_topic: str | None) -> Properties | None:
    if response_topic is None:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = response_topic
    props.CorrelationData = response_topic.encode()
    return props


async def _flood(port: int, devices: list[str], unique: str, flood: int) -> dict[str, Any]:
    """Send the hostile requests and the flood; wait for their answers; say what came back."""
    listener = Listener()
    victim, other = devices[0], devices[1]
    async with aiomqtt.Client(
        "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, max_queued_incoming_messages=0
    ) as client:
        await client.subscribe(f"{PREFIX}/#", qos=1)
        listening = asyncio.create_task(_listen(client, listener))
        malformed = _malformed(victim)
        for i, payload in enumerate(malformed):
            rt = f"{PREFIX}/{victim}/bad/{i}"
            await client.publish(f"{PREFIX}/{victim}", payload, qos=1, properties=_props(rt))
        # Answers must stay in the requested device's subtree (a per-device ACL covers it).
        await client.publish(
            f"{PREFIX}/{victim}",
            b'{"limit": 3}',
            qos=1,
            properties=_props(f"{PREFIX}/{other}/planted/x"),
        )
        # Retained requests are ignored, and so is the empty publish that clears one.
        await client.publish(f"{PREFIX}/{unique}-retained", b'{"limit": 1}', qos=1, retain=True)
        await client.publish(f"{PREFIX}/{unique}-retained", b"", qos=1, retain=True)
        for i in range(flood):
            device = devices[i % len(devices)]
            rt = f"{PREFIX}/{device}/flood/{i}"
            limit = json.dumps({"limit": 5, "id": f"f{i}"}).encode()
            await client.publish(f"{PREFIX}/{device}", limit, qos=1, properties=_props(rt))
        rng = random.Random(unique)
        for i in range(flood // 4):
            # Never empty or blank: an empty request is a valid one (everything), and the seed
            # is random per run (a run drew one: flaky).
            junk = b"\xff" + rng.randbytes(rng.randint(0, 299))
            rt = f"{PREFIX}/{victim}/junk/{i}"
            await client.publish(f"{PREFIX}/{victim}", junk, qos=1, properties=_props(rt))

        def answered() -> int:
            return len(listener.terminals(f"{PREFIX}/{victim}/bad/")) + sum(
                len(listener.terminals(f"{PREFIX}/{d}/flood/")) for d in devices
            )

        expected = len(malformed) + flood
        async with asyncio.timeout(120):
            while (
                answered() < expected
                or len(listener.terminals(f"{PREFIX}/{victim}/junk/")) < flood // 4
            ):
                await asyncio.sleep(0.1)
        await asyncio.sleep(1)  # a stray answer (retained, planted) would come by now
        listening.cancel()
    flood_terminals = [t for d in devices for t in listener.terminals(f"{PREFIX}/{d}/flood/")]
    return {
        "bad": listener.terminals(f"{PREFIX}/{victim}/bad/"),
        "junk": listener.terminals(f"{PREFIX}/{victim}/junk/"),
        "flood": flood_terminals,
        "planted": [a for t, a in listener.answers if t.startswith(f"{PREFIX}/{other}/planted")],
        "retained": [a for t, a in listener.answers if t.startswith(f"{PREFIX}/{unique}-ret")],
    }


def test_hostile_restore_requests_and_floods_beside_ingest(
    own_broker: Broker, data_dir: Path, unique: str, tmp_path: Path, report: Report
) -> None:
    """Hostile restore requests and request floods while ingest runs"""
    flood = size(150, 1000)
    devices = fleet(unique, 4)
    with bridge_process(own_broker.url, data_dir, tmp_path / "bridge.log") as bridge:
        bridge.start()
        publisher = Publisher(own_broker.port, devices, rate=RATE).start()
        publisher.wait_accepted(size(300, 2000))
        seen = asyncio.run(_flood(own_broker.port, devices, unique, flood))
        publisher.wait_accepted(size(300, 2000))
        ledger = publisher.stop()
        back = read_back(ledger, data_dir, own_broker.url)
        assert bridge.proc is not None
        alive = bridge.proc.poll() is None
        log = bridge.text()
    outcomes = Counter("done" if "done" in t else "error" for t in seen["flood"])
    report(
        malformed=len(seen["bad"]),
        malformed_answered_with_error=sum("error" in t for t in seen["bad"]),
        junk_answered_with_error=sum("error" in t for t in seen["junk"]),
        flood=flood,
        flood_done=outcomes["done"],
        flood_refused_busy=outcomes["error"],
        answers_planted_under_another_device=len(seen["planted"]),
        answers_to_retained_requests=len(seen["retained"]),
        export=back.export,
        restore=back.restore,
    )
    assert alive, log
    assert "Traceback" not in log
    assert all("error" in t for t in seen["bad"]), [t for t in seen["bad"] if "error" not in t]
    assert all("error" in t for t in seen["junk"])
    assert all(t.get("done") or "try again" in t.get("error", "") for t in seen["flood"])
    assert seen["planted"] == [], "answered under another device's subtree"
    assert seen["retained"] == [], "a retained request was answered"
    assert_nothing_lost(back)


# ---- hostile messages to store ------------------------------------------------------------------

MAX_PACKET = 1024 * 1024  # the broker's max_packet_size in this test
TOPIC_LIMIT = 65535  # bytes of UTF-8, MQTT's limit


def _varint_len(n: int) -> int:
    length = 1
    while n >= 128:
        n //= 128
        length += 1
    return length


def _largest_payload(topic: str, packet_limit: int) -> int:
    """The payload that makes an MQTT 5 QoS 1 PUBLISH (no properties) exactly `packet_limit`."""
    fixed = 2 + len(topic.encode()) + 2 + 1  # topic length + topic, packet id, properties length
    payload = packet_limit - 1 - 4 - fixed
    while 1 + _varint_len(fixed + payload) + fixed + payload < packet_limit:
        payload += 1
    return payload


def _hostile_messages(unique: str) -> list[tuple[str, bytes, int | None]]:
    """(topic, payload, payload format indicator) of each hostile message."""
    rng = random.Random(unique)
    device = f"{unique}-hostile"
    wide = f"{unique}-ünï-😀"
    base = f"devices/{device}/"
    long_topic = base + "x" * (TOPIC_LIMIT - len(base.encode()))
    multibyte = f"devices/{wide}/"
    room = TOPIC_LIMIT - len(multibyte.encode())
    long_multibyte = multibyte + "é" * (room // 2) + "x" * (room % 2)
    big_topic = base + "big"
    return [
        (base + "empty", b"", None),
        (base + "nul", b"\x00" * 17, None),
        (base + "bad-utf8", b"\xff\xfe\xfd", None),
        (base + "overlong", b"\xc0\xaf", None),
        (base + "surrogate", b"\xed\xa0\x80", None),
        (base + "truncated", "é".encode()[:1], None),
        (base + "says-utf8", b"\xff not utf-8", 1),
        (big_topic, rng.randbytes(_largest_payload(big_topic, MAX_PACKET)), None),
        (long_topic, b"long topic", None),
        (long_multibyte, b"long multibyte topic", None),
        (f"devices/{wide}/t", "grüße 😀".encode(), 1),
    ]


async def _publish_each(port: int, messages: list[tuple[str, bytes, int | None]]) -> list[int]:
    """Publish one by one (a refusal closes the connection); indexes the broker acknowledged."""
    accepted = []
    for i, (topic, payload, indicator) in enumerate(messages):
        props = None
        if indicator is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.PayloadFormatIndicator = indicator
        try:
            async with aiomqtt.Client(
                "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, timeout=10
            ) as client:
                async with asyncio.timeout(15):
                    await client.publish(topic, payload, qos=1, properties=props)
                accepted.append(i)
        except (aiomqtt.MqttError, TimeoutError):
            continue
    return accepted


def _decoded(line: dict[str, Any]) -> tuple[str, bytes]:
    text = line["payload"]
    raw = base64.b64decode(text) if line["encoding"] == "base64" else text.encode("utf-8")
    return line["topic"], raw


def test_hostile_messages_are_stored_byte_exact(
    make_broker: BrokerFactory,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    report: Report,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Hostile ingest input: empty, maximum-size, invalid UTF-8 payloads, topics at the limit.

    A message of the broker's maximum packet size is stored and exported byte-exact; its JSON
    answer cannot fit a packet, so the restore that meets it ends with an error terminal that
    says what to use instead, and the restore connection and the other restores carry on.
    """
    caplog.set_level(logging.WARNING, logger="mqtt_backup.restore")
    broker = make_broker(f"max_packet_size {MAX_PACKET}")
    bridge = run_bridge(make_settings(broker, data_dir))
    wait_until(bridge.bridge.restore_listening.is_set, 30, "the restore service")
    messages = _hostile_messages(unique)
    accepted = asyncio.run(_publish_each(broker.port, messages))
    ledger = Counter((messages[i][0], messages[i][1]) for i in accepted)
    big = (messages[7][0], messages[7][1])
    devices = sorted({topic.split("/")[1] for topic, _ in ledger})
    # The index count first (in this process), then the export (a process) once or twice.
    wanted = ledger.total()
    wait_until(lambda: stored_total(data_dir, devices) >= wanted, 60, "the hostile messages")
    wait_until(lambda: _exported(data_dir, devices) >= ledger, 60, "the hostile messages")
    restored: Counter[tuple[str, bytes]] = Counter()
    errors: list[str] = []
    for device in devices:
        # Oldest first up to the big message, then newest first down to it: all but that one.
        for fields in ({}, {"order": "desc"}):
            lines: list[dict[str, Any]] = []
            question = Ask(
                BrokerTarget(parse_broker_url(broker.url)), request_for(device, fields), timeout=30
            )
            end = asyncio.run(ask(question, lines.append))
            restored.update(_decoded(line) for line in lines)
            if "error" in end:
                assert end.get("id"), "the error terminal carries the request's id"
                errors.append(end["error"])
            if "done" in end:
                break  # everything in one go
    bridge.stop()
    exported = _exported(data_dir, devices)
    report(
        published=len(messages),
        accepted_by_the_broker=len(accepted),
        refused_by_the_broker=[
            messages[i][0][-12:] for i in range(len(messages)) if i not in accepted
        ],
        largest_payload=len(messages[7][1]),
        export_exact=exported == ledger,
        restore_exact_but_the_largest=restored + Counter([big]) == ledger,
        restore_errors=errors,
    )
    assert 7 in accepted, "the maximum-size message must be accepted"
    assert {8, 9} <= set(accepted), "topics at the length limit must be accepted"
    assert exported == ledger, "export differs from what the broker accepted"
    assert restored + Counter([big]) == ledger, "restore differs from what the broker accepted"
    assert len(errors) == 2  # one per direction, both at the big message
    for error in errors:
        assert "maximum packet size" in error
        assert '"format": "raw"' in error
        assert "mqtt-backup export" in error
    reconnects = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert reconnects == [], "the restore connection must not drop"


def _exported(data: Path, devices: list[str]) -> Counter[tuple[str, bytes]]:
    args = [a for d in devices for a in ("--device", d)]
    done = cli("export", "--data", str(data), *args)
    if done.returncode != 0:
        return Counter()
    return Counter(_decoded(json.loads(line)) for line in done.stdout.splitlines() if line)
