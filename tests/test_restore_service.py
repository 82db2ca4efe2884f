"""The restore service against a real broker and a real bridge: hostile requests, fairness, gaps.

The service's own tests (issue 8); tests/test_restore_e2e.py holds the protocol round trips.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_backup.config import BrokerTarget, ProtocolVersion, Settings, parse_broker_url
from mqtt_backup.errors import BrokerUnreachable
from mqtt_backup.mqtt import AsyncConnection, aio, async_ingest, codec
from mqtt_backup.mqtt import ingest as paho_ingest
from mqtt_backup.restore.service import DROPPED_TOPIC, RETAINED_TOLD_MAX, RestoreService
from mqtt_backup.times import parse_time
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

if TYPE_CHECKING:
    from mqtt_backup.storage import LiveReader
    from mqtt_backup.storage.journal import GapLog

RunBridge = Callable[[Settings], BridgeThread]
Message = dict[str, Any]
IGNORED = "ignoring retained restore request"


def _start(run_bridge: RunBridge, settings: Settings) -> BridgeThread:
    bridge = run_bridge(settings)
    wait_until(bridge.bridge.restore_listening.is_set, 20, "the restore service to subscribe")
    return bridge


async def _collect_until(
    broker: Broker,
    listen: list[str],
    requests: Sequence[tuple[str, bytes, bool, Properties | None]],
    last_id: str,
    timeout: float = 20,
) -> list[Message]:
    """Subscribe to `listen`, publish (topic, payload, retain, props) in order, collect the
    answers (with their `_topic`) until the terminal of the request whose id is `last_id`."""
    answers: list[Message] = []
    async with device_client(broker) as client:
        for topic in listen:
            await client.subscribe(topic, qos=1)
        for topic, payload, retain, props in requests:
            await client.publish(topic, payload, qos=1, retain=retain, properties=props)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                body = json.loads(message.payload)
                answers.append({"_topic": message.topic.value, **body})
                if body.get("id") == last_id and ("done" in body or "error" in body):
                    return answers
    return answers


def _ignored(caplog: pytest.LogCaptureFixture) -> int:
    return caplog.text.count(IGNORED)


# ---- retained requests (issue 8, item 7) --------------------------------------------------------


def test_a_live_retained_request_and_its_clearing_publish_are_ignored(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # DEBUG: the second publish on the same topic is told at DEBUG (once per topic at INFO).
    caplog.set_level(logging.DEBUG, logger="mqtt_backup.restore")
    device = f"{unique}-live-ret"
    request = f"backup/restore/{device}"
    _start(run_bridge, make_settings(broker, data_dir))
    publish(broker, [Sent(f"devices/{device}/t", b"stored")])
    requests = [
        (request, b'{"id": "retained"}', True, None),
        (request, b"", True, None),  # clears the retained request: must not ask for everything
        (request, b'{"id": "plain"}', False, None),
    ]
    try:
        answers = asyncio.run(_collect_until(broker, [f"{request}/response"], requests, "plain"))
        wait_until(lambda: _ignored(caplog) >= 2, 10, "both retained publishes to be ignored")
    finally:
        publish(broker, [Sent(request, b"", retain=True)])
    assert [a.get("id") for a in answers] == ["plain"] * len(answers), answers
    assert answers[-1]["done"] is True


def test_retained_requests_are_told_once_per_topic_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found in review: every retained request was an INFO line, replayed at every reconnect.
    caplog.set_level(logging.DEBUG, logger="mqtt_backup.restore")
    # Telling needs neither the store nor the gap log.
    service = RestoreService(cast("LiveReader", None), cast("GapLog", None))
    for _ in range(3):
        for n in range(RETAINED_TOLD_MAX + 10):
            service._ignore_retained(f"backup/restore/dev-{n}")
    info = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == RETAINED_TOLD_MAX
    assert len(caplog.records) == 3 * (RETAINED_TOLD_MAX + 10)


def test_a_stale_retained_request_is_ignored_on_mqtt_311(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # MQTT 3.1.1 hides the flag of live messages, but a retained message sent because of a new
    # subscription carries it: the stale request is still ignored.
    caplog.set_level(logging.INFO, logger="mqtt_backup.restore")
    device = f"{unique}-stale-311"
    request = f"backup/restore/{device}"
    publish(broker, [Sent(request, b'{"id": "stale"}', retain=True)])
    try:
        _start(run_bridge, make_settings(broker, data_dir, protocol="3.1.1"))
        wait_until(lambda: _ignored(caplog) >= 1, 10, "the stale request to be ignored")
        answers = asyncio.run(
            _collect_until(
                broker, [f"{request}/response"], [(request, b'{"id": "now"}', False, None)], "now"
            )
        )
    finally:
        publish(broker, [Sent(request, b"", retain=True)])
    assert [a.get("id") for a in answers] == ["now"], answers


# ---- response topics (issue 8, item 6) ----------------------------------------------------------


def test_a_response_topic_under_another_device_is_refused(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    _start(run_bridge, make_settings(broker, data_dir))
    mine, other = f"{unique}-a", f"{unique}-b"
    publish(broker, [Sent(f"devices/{mine}/t", b"a's secret")])
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = f"backup/restore/{other}/r/x"
    request = f"backup/restore/{mine}"
    answers = asyncio.run(
        _collect_until(
            broker,
            [f"{request}/response", f"backup/restore/{other}/#"],
            [(request, b'{"id": "steal"}', False, props)],
            "steal",
        )
    )
    assert len(answers) == 1, answers
    assert answers[0]["_topic"] == f"{request}/response"
    assert f"backup/restore/{other}/r/x" in answers[0]["error"]


# ---- a lost connection in the log (issue 8, small items) ----------------------------------------


def test_a_socket_closed_under_a_pending_write_is_one_warning_line(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    # aiomqtt schedules add_writer(fd) from paho's callback; when the connection drops first,
    # add_writer meets a closed descriptor. The same race, forced on a connected client's loop:
    async def scenario() -> None:
        async with AsyncConnection(BrokerTarget(parse_broker_url(broker.url))):
            loop = asyncio.get_running_loop()
            gone = socket.socket()
            fd = gone.fileno()
            loop.call_soon(gone.close)
            loop.call_soon(loop.add_writer, fd, lambda: None)
            await _after_the_callbacks_before(loop)

    caplog.set_level(logging.WARNING)
    asyncio.run(scenario())
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelno, r.exc_info) for r in lines] == [(logging.WARNING, None)], caplog.text
    assert "closed while it had a write pending" in lines[0].getMessage()
    assert "Traceback" not in caplog.text


async def _after_the_callbacks_before(loop: asyncio.AbstractEventLoop) -> None:
    """Return once every callback scheduled so far has run (the loop runs them in order)."""
    done = loop.create_future()
    loop.call_soon(done.set_result, None)
    await done


def test_other_loop_errors_still_reach_the_previous_handler(broker: Broker) -> None:
    seen: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: seen.append(context["message"]))
        async with AsyncConnection(BrokerTarget(parse_broker_url(broker.url))):
            loop.call_soon(_boom)
            await _after_the_callbacks_before(loop)

    asyncio.run(scenario())
    assert len(seen) == 1
    assert "_boom" in seen[0]


def _boom() -> None:
    raise RuntimeError("a bug elsewhere")


# ---- broker drops (issue 8, item 3) --------------------------------------------------------------


def _overlay_broker(tmp_path: Path, overlay: str) -> Iterator[Broker]:
    broker = Broker("dev.conf", tmp_path / "broker", (overlay,))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def no_sys_broker(tmp_path: Path) -> Iterator[Broker]:
    """dev.conf + mosquitto/no-sys.conf: no $SYS topics."""
    yield from _overlay_broker(tmp_path, "no-sys.conf")


async def _dropped_at_least(broker: Broker, least: int) -> int:
    async with device_client(broker) as client:
        await client.subscribe(DROPPED_TOPIC)
        async with asyncio.timeout(30):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                if int(message.payload) >= least:
                    return int(message.payload)
    raise AssertionError("unreachable")


def _restore(broker: Broker, device: str, request_id: str) -> Message:
    request = f"backup/restore/{device}"
    answers = asyncio.run(
        _collect_until(
            broker,
            [f"{request}/response"],
            [(request, json.dumps({"id": request_id}).encode(), False, None)],
            request_id,
        )
    )
    return answers[-1]


def test_broker_drops_while_the_bridge_is_away_make_the_restore_incomplete(
    small_queue_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    broker = small_queue_broker
    device = f"{unique}-away"
    settings = make_settings(broker, data_dir)
    first = _start(run_bridge, settings)
    publish(broker, [Sent(f"devices/{device}/t", b"before")])
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "the first message")
    wait_until((data_dir / "broker-dropped.json").exists, 20, "a first reading of the counter")
    first.stop()
    stopped_ns = time.time_ns()
    publish(broker, [Sent(f"devices/{device}/t", b"%d" % i) for i in range(400)])
    asyncio.run(_dropped_at_least(broker, 300))  # the broker kept 100 for the bridge
    restarted_ns = time.time_ns()
    _start(run_bridge, settings)
    wait_until(lambda: stored_count(data_dir) >= 101, 30, "the 100 queued messages")
    done = _restore(broker, device, "after")
    assert done["count"] == 101
    assert done["complete"] is False
    assert "broker_drops" not in done
    gaps = [g for g in done["gaps"] if g["reason"] == "broker-dropped"]
    assert len(gaps) == 1, done
    # The span covers the downtime: from before the stop to after the restart.
    assert parse_time(gaps[0]["since"], "since") <= stopped_ns
    assert parse_time(gaps[0]["until"], "until") >= restarted_ns


def test_a_broker_without_the_dropped_counter_makes_drops_unknown(
    no_sys_broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    device = f"{unique}-nosys"
    _start(run_bridge, make_settings(no_sys_broker, data_dir))
    publish(no_sys_broker, [Sent(f"devices/{device}/t", b"x")])
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "the message")
    done = _restore(no_sys_broker, device, "u")
    assert done == {
        "_topic": f"backup/restore/{device}/response",
        "id": "u",
        "done": True,
        "protocol": 1,
        "device": device,
        "count": 1,
        "complete": True,
        "broker_drops": "unknown",
    }


def test_drops_are_known_on_a_broker_with_the_counter(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    device = f"{unique}-sys"
    _start(run_bridge, make_settings(broker, data_dir))
    done = _restore(broker, device, "k")
    assert (done["complete"], "broker_drops" in done) == (True, False), done


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_stop_while_the_restore_service_waits_for_a_connack_is_seen_at_once(
    own_broker: Broker,
    data_dir: Path,
    run_bridge: RunBridge,
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
) -> None:
    # The broker goes; what listens on its port then takes TCP and never answers CONNECT. The
    # ingest saw a stop during that handshake at once, but the restore service's reconnect
    # waited for its whole CONNACK timeout: a SIGTERM then took ~10 s (and, on 3.1.1, aiomqtt's
    # timed-out client kept its socket). The wait is made far longer than `stop`'s patience
    # here, so only a stop seen during the handshake passes.
    for module in (codec, aio, async_ingest, paho_ingest):
        monkeypatch.setattr(module, "CONNECT_TIMEOUT_S", 600.0)
    bridge = _start(run_bridge, make_settings(own_broker, data_dir, protocol=protocol))
    own_broker.stop()
    wait_until(lambda: not bridge.bridge.restore_listening.is_set(), 20, "the restore side down")
    silent = socket.create_server(("127.0.0.1", own_broker.port))
    taken: list[socket.socket] = []
    try:
        silent.settimeout(20)
        while len(taken) < 2:  # the ingest's and the restore service's reconnects
            taken.append(silent.accept()[0])
        bridge.stop()  # joins within 30 s, or fails
    finally:
        for conn in taken:
            conn.close()
        silent.close()


def test_a_timed_out_311_connect_leaves_no_socket_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    # aiomqtt kept a CONNECT it gave up on open (and its reader task pending): against a silent
    # broker, the restore service held one socket more per retry, and a traceback at exit.
    monkeypatch.setattr(aio, "CONNECT_TIMEOUT_S", 0.5)
    silent = socket.create_server(("127.0.0.1", 0))
    url = f"mqtt://127.0.0.1:{silent.getsockname()[1]}"

    async def connect() -> None:
        async with AsyncConnection(BrokerTarget(parse_broker_url(url), ProtocolVersion.V311)):
            pass

    try:
        with pytest.raises(BrokerUnreachable):
            asyncio.run(connect())
        conn = silent.accept()[0]
        conn.settimeout(20)
        with conn:
            conn.recv(1024)  # the CONNECT
            assert conn.recv(1024) == b""  # closed by the client, not left open
    finally:
        silent.close()
