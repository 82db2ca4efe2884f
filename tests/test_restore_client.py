"""The restore client (mqtt_backup.restore.client) against answers a real bridge does not give.

A scripted bridge on a real Mosquitto answers the request the way a faulty or older service, or
a broker that dropped messages, would; the client must neither wait for its timeout nor leave a
silent hole.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.config import BrokerTarget, parse_broker_url
from mqtt_backup.errors import EXIT_RUNTIME, EXIT_USAGE
from mqtt_backup.mqtt import CodecConnection, Delivery
from mqtt_backup.records import Properties
from mqtt_backup.restore.client import Ask, LostOnTheWay, ask, request_for
from tests.conftest import Broker

Answer = list[tuple[str, dict[str, Any]]]


async def _fake_bridge(
    broker: Broker, device: str, ready: asyncio.Event, answer: Callable[[Delivery], Answer]
) -> None:
    """Take one request for `device`; publish what `answer` makes of it, with its correlation."""
    async with CodecConnection(BrokerTarget(parse_broker_url(broker.url))) as conn:
        await conn.subscribe([f"backup/restore/{device}"])
        ready.set()
        request = (await conn.receive())[0]
        props = Properties(correlation_data=request.correlation_data)
        for topic, body in answer(request):
            await conn.publish(topic, json.dumps(body).encode(), props=props)


def _restore(
    broker: Broker,
    device: str,
    answer: Callable[[Delivery], Answer],
    timeout: float = 30,
    fields: dict[str, Any] | None = None,
) -> Any:
    """Run the client against the scripted bridge; (terminal or raised error, lines written)."""
    lines: list[dict[str, Any]] = []

    async def scenario() -> Any:
        ready = asyncio.Event()
        bridge = asyncio.create_task(_fake_bridge(broker, device, ready, answer))
        await ready.wait()
        question = Ask(
            BrokerTarget(parse_broker_url(broker.url)),
            request_for(device, fields or {}),
            timeout=timeout,
        )
        try:
            return await ask(question, lines.append)
        except LostOnTheWay as exc:
            return exc
        finally:
            await bridge

    return asyncio.run(scenario()), lines


def _request_id(request: Delivery) -> str:
    return str(json.loads(request.payload)["id"])


def test_an_error_without_id_on_our_own_topic_ends_the_wait(broker: Broker, unique: str) -> None:
    device = f"{unique}-err"

    def answer(request: Delivery) -> Answer:
        assert request.response_topic is not None
        return [
            # Someone else's id-less error on the shared default topic is not ours...
            (f"backup/restore/{device}/response", {"error": "not yours"}),
            # ...but one on our own response topic, with our correlation data, is.
            (request.response_topic, {"error": "request is not valid JSON"}),
        ]

    terminal, lines = _restore(broker, device, answer)
    assert terminal == {"error": "request is not valid JSON"}
    assert lines == []


def test_messages_lost_on_the_way_fail_the_restore_loudly(broker: Broker, unique: str) -> None:
    device = f"{unique}-holes"

    def answer(request: Delivery) -> Answer:
        assert request.response_topic is not None
        rid = _request_id(request)
        kept = [1, 2, 4, 7]  # what a full broker queue let through of seq 1..7
        messages = [(request.response_topic, {"id": rid, "seq": s, "payload": s}) for s in kept]
        done = {"id": rid, "done": True, "device": device, "count": 7, "complete": True}
        return [*messages, (request.response_topic, done)]

    error, lines = _restore(broker, device, answer)
    assert isinstance(error, LostOnTheWay)
    assert error.exit_code == EXIT_RUNTIME
    assert "3 of 7 messages did not arrive (missing seq 3, 5-6)" in error.message()
    assert [line["seq"] for line in lines] == [1, 2, 4, 7], "what arrived is still written"


def test_an_answer_that_stops_after_holes_blames_the_broker_queue(
    broker: Broker, unique: str
) -> None:
    # What a stock Mosquitto (max_queued_messages 1000) does to a slow reader: it drops the
    # overflow, the terminal included. Measured by hand: 4,362 of 10,000 lines, no terminal.
    device = f"{unique}-cut"

    def answer(request: Delivery) -> Answer:
        assert request.response_topic is not None
        rid = _request_id(request)
        return [(request.response_topic, {"id": rid, "seq": s}) for s in (1, 2, 5)]

    error, lines = _restore(broker, device, answer, timeout=1)
    assert isinstance(error, LostOnTheWay)
    assert "3 messages arrived (missing seq 3-4), then nothing for 1 s" in error.message()
    assert "max_queued_messages" in error.message()
    assert len(lines) == 3


def test_a_replay_is_not_counted_as_lost(broker: Broker, unique: str) -> None:
    # A replay republishes to the original topics: only the terminal comes back to us, with
    # the count of what was republished. Found running the README: `restore --replay` exited 1
    # saying "2 of 2 messages did not arrive".
    device = f"{unique}-replay"

    def answer(request: Delivery) -> Answer:
        assert request.response_topic is not None
        done = {"id": _request_id(request), "done": True, "device": device, "count": 2}
        return [(request.response_topic, {**done, "complete": True})]

    terminal, lines = _restore(broker, device, answer, fields={"mode": "replay"})
    assert not isinstance(terminal, LostOnTheWay), terminal.message()
    assert terminal["count"] == 2
    assert lines == []


@pytest.mark.parametrize("rate", ["inf", "-inf", "nan", "0", "-1"])
def test_replay_rate_must_be_finite_and_positive(rate: str) -> None:
    result = CliRunner().invoke(app, ["restore", "dev-1", "--replay", "--rate", rate])
    assert result.exit_code == EXIT_USAGE, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("mqtt-backup: --rate must be a finite number > 0"), lines


def test_a_batch_is_flushed_before_its_messages_are_acknowledged(
    broker: Broker, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI writes a batch's lines in one write, in `flush`: the broker must not hear that a
    # message is done before that write (acknowledge what is written).
    device, total = f"{unique}-flush", 600  # several batches of half our Receive Maximum
    taken: list[int] = []
    written: list[int] = []
    acked: list[int] = []
    real_ack = CodecConnection.ack

    def ack(conn: CodecConnection, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            seq = json.loads(delivery.payload).get("seq")
            if seq is not None:
                assert seq in written, f"seq {seq} acknowledged before it was written"
                acked.append(seq)
        real_ack(conn, deliveries)

    monkeypatch.setattr(CodecConnection, "ack", ack)

    def answer(request: Delivery) -> Answer:
        assert request.response_topic is not None
        rid = _request_id(request)
        messages = [(request.response_topic, {"id": rid, "seq": s}) for s in range(1, total + 1)]
        done = {"id": rid, "done": True, "device": device, "count": total, "complete": True}
        return [*messages, (request.response_topic, done)]

    def flush() -> None:
        written.extend(taken)
        taken.clear()

    async def scenario() -> dict[str, Any]:
        ready = asyncio.Event()
        bridge = asyncio.create_task(_fake_bridge(broker, device, ready, answer))
        await ready.wait()
        question = Ask(BrokerTarget(parse_broker_url(broker.url)), request_for(device, {}))
        try:
            return await ask(question, lambda body: taken.append(body["seq"]), flush)
        finally:
            await bridge

    terminal = asyncio.run(scenario())
    assert terminal["count"] == total
    assert written == acked == list(range(1, total + 1))
