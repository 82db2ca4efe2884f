"""The asyncio ingest transport's edges: what it sends, what it refuses, how it holds and stops.

What a real broker will not do on demand (refuse, hang up after the SUBACK, go silent, replay a
packet id on a new connection) comes from a scripted broker on its own thread that speaks through
the `mqtt5` codec and records every packet per connection. Pausing under a full hold runs
against the real Mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import mqtt5
import pytest

from mqtt_backup import config
from mqtt_backup.bridge import Bridge
from mqtt_backup.config import BrokerAddress, BrokerTarget
from mqtt_backup.errors import BrokerRefused, BrokerUnreachable, ConfigError
from mqtt_backup.ingest import AckCallback, CommitPipeline
from mqtt_backup.mqtt import AsyncIngest, PahoIngest, Session, async_ingest
from mqtt_backup.mqtt import ingest as paho_ingest
from mqtt_backup.mqtt.loop_ingest import LoopIngest
from mqtt_backup.mqtt.session import REPLAY_PROPERTY
from mqtt_backup.storage import Pending, Store
from mqtt_backup.topics import Router, parse_template
from tests.conftest import Broker, Sent, publish, read_all, wait_until
from tests.faulty import Faults, FaultyStore
from tools.devbroker import free_port

Answer = tuple[bytes, bool]  # bytes to send, then hang up
Script = Callable[[int, mqtt5.Packet], Answer | None]

OK_CONNACK = mqtt5.ConnAckPacket().write()


def _suback(packet: mqtt5.SubscribePacket) -> bytes:
    granted = [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE] * len(packet.topic_filters)
    return mqtt5.SubAckPacket(packet.packet_id, granted).write()


def _publish(packet_id: int | None, payload: bytes, **options: object) -> bytes:
    qos = mqtt5.QoS.AT_MOST_ONCE if packet_id is None else mqtt5.QoS.AT_LEAST_ONCE
    return mqtt5.PublishPacket(
        "devices/d1/t",
        payload,
        qos=qos,
        packet_id=packet_id,
        **options,  # type: ignore[arg-type]
    ).write()


def accept(then: Callable[[int], bytes] = lambda _conn: b"") -> Script:
    """A broker that accepts and subscribes; after the SUBACK it sends `then(connection)`."""

    def script(conn: int, packet: mqtt5.Packet) -> Answer | None:
        match packet:
            case mqtt5.ConnectPacket():
                return OK_CONNACK, False
            case mqtt5.SubscribePacket():
                return _suback(packet) + then(conn), False
            case mqtt5.PingReqPacket():
                return mqtt5.PingRespPacket().write(), False
            case mqtt5.DisconnectPacket():
                return b"", True
        return None

    return script


class FakeBroker:
    """A scripted MQTT 5 broker on its own thread; `got[n]` are the packets of connection n."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.got: list[list[mqtt5.Packet]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fake-broker", daemon=True)
        self._server: asyncio.Server | None = None
        self.resets: list[int] = []  # connections the bridge ended with a reset
        self.ended: list[int] = []

    @property
    def address(self) -> BrokerAddress:
        """Where the bridge connects."""
        return BrokerAddress("127.0.0.1", self.port, username="u", password="p")

    def __enter__(self) -> FakeBroker:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._server.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = len(self.got)
        self.got.append([])
        self._writers.append(writer)
        try:
            await self._read(conn, reader, writer)
        except ConnectionResetError:
            self.resets.append(conn)
        except ConnectionError:
            pass
        # Not in a `finally`: a session still open when the test's loop stops is closed with it.
        writer.close()
        self.ended.append(conn)

    async def _read(
        self, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer each packet by the script until the bridge closes or the script hangs up."""
        buffer = b""
        while chunk := await reader.read(65536):
            buffer += chunk
            while True:
                try:
                    packet, size = mqtt5.read(memoryview(buffer))
                except IndexError:
                    break
                buffer = buffer[size:]
                self.got[conn].append(packet)
                answer = self.script(conn, packet)
                if answer is not None:
                    writer.write(answer[0])
                    if answer[1]:
                        await writer.drain()
                        return

    def push(self, conn: int, data: bytes) -> None:
        """Send `data` on connection `conn` now, unasked."""
        self._loop.call_soon_threadsafe(self._writers[conn].write, data)

    def pubacks(self, conn: int) -> list[int]:
        """Packet ids the bridge acknowledged on connection `conn`."""
        if conn >= len(self.got):
            return []
        return [p.packet_id for p in self.got[conn] if isinstance(p, mqtt5.PubAckPacket)]


class Hooks:
    """The bridge's side: records what it hears; `on_tick` runs at every tick."""

    def __init__(self) -> None:
        self.connects: list[bool] = []
        self.disconnects: list[str] = []
        self.on_tick: Callable[[], None] = lambda: None

    def connected(self, session_present: bool, _subscribed: Sequence[str]) -> None:
        self.connects.append(session_present)

    def disconnected(self, reason: str) -> None:
        self.disconnects.append(reason)

    def tick(self) -> None:
        self.on_tick()


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    """A new 3-partition store, closed after the test."""
    opened = Store.open(data_dir, 3)
    yield opened
    opened.close()


def _pipeline(
    store: Store, faults: Faults, ack: AckCallback, batch_max: int = 50
) -> CommitPipeline:
    router = Router([parse_template("devices/{device}/#")], "backup")
    return CommitPipeline(faults.wrap(store), router, ack, batch_max=batch_max, batch_ms=10)


def _ingest(
    address: BrokerAddress, hooks: Hooks, *filters: str, keepalive: int = 10
) -> AsyncIngest:
    session = Session(
        BrokerTarget(address), "ingest-test", keepalive=keepalive, receive_maximum=100
    )
    return AsyncIngest(session, list(filters or ["devices/+/#"]), hooks)


class Running:
    """`LoopIngest.run` (either transport) on a thread until the block ends (or `stop` is set)."""

    def __init__(self, ingest: LoopIngest, pipeline: CommitPipeline) -> None:
        self.stop = threading.Event()
        self._thread = threading.Thread(target=ingest.run, args=(pipeline, self.stop), daemon=True)

    def __enter__(self) -> Running:
        self._thread.start()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop.set()
        self._thread.join(20)
        assert not self._thread.is_alive(), "the transport did not stop"


# ---- connecting ---------------------------------------------------------------------------------


def test_connect_resumes_the_session_with_the_subscription_options(store: Store) -> None:
    hooks, faults = Hooks(), Faults()

    def resume(conn: int, packet: mqtt5.Packet) -> Answer | None:
        if isinstance(packet, mqtt5.ConnectPacket):
            return mqtt5.ConnAckPacket(session_present=True).write(), False
        return accept()(conn, packet)

    with FakeBroker(resume) as broker:
        ingest = _ingest(broker.address, hooks, "devices/+/#", "$share/g/tele/+/x")
        pipeline = _pipeline(store, faults, ingest.ack)
        ingest.connect(pipeline, ["devices/+/#", "old/+/#"])
        with Running(ingest, pipeline):
            wait_until(lambda: len(broker.got[0]) >= 3, 10, "CONNECT, SUBSCRIBE, UNSUBSCRIBE")
    connect, subscribe, unsubscribe = broker.got[0][:3]
    assert isinstance(connect, mqtt5.ConnectPacket)
    assert not connect.clean_start, "a clean start would wipe the queued messages"
    assert connect.session_expiry_interval == 7 * 24 * 3600
    assert (connect.receive_max, connect.keep_alive) == (100, 10)
    assert (connect.username, connect.password) == ("u", b"p")
    assert isinstance(subscribe, mqtt5.SubscribePacket)
    options = {
        f.pattern: (f.max_qos, f.no_local, f.retain_as_published, f.retain_handling)
        for f in subscribe.topic_filters
    }
    once = mqtt5.RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS
    assert options == {
        "devices/+/#": (mqtt5.QoS.AT_LEAST_ONCE, True, True, once),
        # No-local is a protocol error on a shared subscription.
        "$share/g/tele/+/x": (mqtt5.QoS.AT_LEAST_ONCE, False, True, once),
    }
    # The resumed session still has a filter no longer configured: it goes.
    assert isinstance(unsubscribe, mqtt5.UnsubscribePacket)
    assert unsubscribe.patterns == ["old/+/#"]
    assert hooks.connects == [True]


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (
            lambda p: (
                mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.NOT_AUTHORIZED).write()
                if isinstance(p, mqtt5.ConnectPacket)
                else b""
            ),
            "not authorized. Try: check the user name and password",
        ),
        (
            lambda p: (
                OK_CONNACK
                if isinstance(p, mqtt5.ConnectPacket)
                else mqtt5.SubAckPacket(
                    p.packet_id,
                    [
                        mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,
                        mqtt5.SubAckReasonCode.NOT_AUTHORIZED,
                    ],
                ).write()
            ),
            "subscription to secret/# (NOT_AUTHORIZED) refused. Try: check the broker's ACL",
        ),
        (
            lambda p: b"\x20\x02\x00\x01" if isinstance(p, mqtt5.ConnectPacket) else b"",
            "did not answer in MQTT 5",  # a 3.1.1-only broker
        ),
    ],
    ids=["connack", "suback", "mqtt-3.1.1-broker"],
)
def test_a_refusal_is_a_broker_error_with_a_hint(
    store: Store, answer: Callable[[mqtt5.Packet], bytes], words: str
) -> None:
    with FakeBroker(lambda _c, p: (answer(p), False)) as broker:
        ingest = _ingest(broker.address, Hooks(), "ok/#", "secret/#")
        with pytest.raises(BrokerRefused) as refused:
            ingest.connect(_pipeline(store, Faults(), ingest.ack), [])
    assert words in refused.value.message()
    assert refused.value.exit_code == 3


def test_nobody_listening_at_start_is_unreachable_with_a_hint(store: Store) -> None:
    ingest = _ingest(BrokerAddress("127.0.0.1", free_port()), Hooks())
    with pytest.raises(BrokerUnreachable) as unreachable:
        ingest.connect(_pipeline(store, Faults(), ingest.ack), [])
    assert "check --broker and that the broker runs" in unreachable.value.message()


# ---- running ------------------------------------------------------------------------------------


def test_acks_of_a_lost_connection_are_never_sent_on_the_next(
    store: Store, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Connection 0 delivers packet id 7 and hangs up; connection 1 reuses id 7 for its resend."""

    def script(conn: int, packet: mqtt5.Packet) -> Answer | None:
        if conn == 0 and isinstance(packet, mqtt5.SubscribePacket):
            return _suback(packet) + _publish(7, b"first"), True
        resend = _publish(7, b"first", duplicate=True) + _publish(8, b"second")
        return accept(lambda _conn: resend)(conn, packet)

    hooks = Hooks()
    with FakeBroker(script) as broker, caplog.at_level(logging.INFO):
        ingest = _ingest(broker.address, hooks)
        pipeline = _pipeline(store, Faults(), ingest.ack)
        with Running(ingest, pipeline):
            wait_until(lambda: len(broker.pubacks(1)) >= 2, 20, "the acks on connection 1")
    assert broker.pubacks(0) == []
    assert broker.pubacks(1) == [7, 8], "connection 0's packet id 7 is acknowledged once, anew"
    assert len(hooks.connects) == 2
    assert len(hooks.disconnects) == 1
    assert "reconnected to mqtt://u@127.0.0.1" in caplog.text
    stored = [(m.record.payload, m.record.dup) for m in read_all(data_dir)["d1"]]
    assert stored == [(b"first", False), (b"first", True), (b"second", False)]


def test_a_silent_broker_is_noticed_by_the_keepalive(store: Store) -> None:
    def no_pong(conn: int, packet: mqtt5.Packet) -> Answer | None:
        if isinstance(packet, mqtt5.PingReqPacket):
            return None
        return accept()(conn, packet)

    hooks = Hooks()
    with FakeBroker(no_pong) as broker:
        ingest = _ingest(broker.address, hooks, keepalive=1)
        pipeline = _pipeline(store, Faults(), ingest.ack)
        with Running(ingest, pipeline):
            wait_until(lambda: hooks.disconnects != [], 20, "the silence to be noticed")
            wait_until(lambda: len(hooks.connects) >= 2, 20, "a new connection")
    assert hooks.disconnects[0].startswith("no answer from the broker for")
    assert any(isinstance(p, mqtt5.PingReqPacket) for p in broker.got[0])


def test_properties_are_kept_and_replays_are_acknowledged_unstored(
    store: Store, data_dir: Path
) -> None:
    messages = (
        _publish(
            1,
            b"with props",
            content_type="application/json",
            response_topic="r/t",
            correlation_data=b"\x00c",
            message_expiry_interval=60,
            payload_format_indicator=1,
            user_properties=[("k", "v"), ("k", "w")],
        )
        + _publish(2, b"replayed", user_properties=[(REPLAY_PROPERTY, "1")])
        + _publish(None, b"qos 0 with props", content_type="x/y")
        + _publish(3, b"plain")
    )
    with FakeBroker(accept(lambda _conn: messages)) as broker:
        ingest = _ingest(broker.address, Hooks())
        pipeline = _pipeline(store, Faults(), ingest.ack)
        with Running(ingest, pipeline):
            wait_until(lambda: len(broker.pubacks(0)) >= 3, 20, "the acks")
    assert broker.pubacks(0) == [1, 2, 3]
    stored = {m.record.payload: m.record for m in read_all(data_dir)["d1"]}
    assert set(stored) == {b"with props", b"qos 0 with props", b"plain"}
    props = stored[b"with props"].properties
    assert props is not None
    assert (props.content_type, props.response_topic, props.correlation_data) == (
        "application/json",
        "r/t",
        b"\x00c",
    )
    assert (props.message_expiry, props.payload_format) == (60, 1)
    assert props.user == (("k", "v"), ("k", "w"))
    qos0 = stored[b"qos 0 with props"]
    assert qos0.qos == 0
    assert qos0.properties is not None
    assert qos0.properties.content_type == "x/y"
    assert stored[b"plain"].properties is None
    assert pipeline.counters.skipped == 1


def test_shutdown_stores_what_is_held_acks_it_then_disconnects(store: Store) -> None:
    """Storage fails until the stop; the stop stores, acknowledges, and only then says goodbye."""
    messages = b"".join(_publish(n, b"m%d" % n) for n in range(1, 4))
    faults, hooks = Faults(failing=True), Hooks()
    with FakeBroker(accept(lambda _conn: messages)) as broker:
        ingest = _ingest(broker.address, hooks)
        pipeline = _pipeline(store, faults, ingest.ack)
        with Running(ingest, pipeline) as running:

            def stop_once_held() -> None:
                if pipeline.pending == 3:
                    faults.failing = False
                    running.stop.set()

            hooks.on_tick = stop_once_held
            wait_until(running.stop.is_set, 20, "three messages held")
        wait_until(lambda: len(broker.got[0]) >= 6, 10, "the acks and the DISCONNECT")
    kinds = [type(p).__name__ for p in broker.got[0]]
    assert kinds[-4:] == ["PubAckPacket"] * 3 + ["DisconnectPacket"]
    assert broker.pubacks(0) == [1, 2, 3]
    assert pipeline.pending == 0
    assert hooks.disconnects == [], "a disconnect we asked for is not a lost connection"


@pytest.mark.parametrize("kind", [AsyncIngest, PahoIngest])
def test_a_clean_stop_half_closes_so_unread_data_cannot_reset_the_connection(
    store: Store, kind: type[AsyncIngest | PahoIngest]
) -> None:
    """A stop with the broker's data still unread in the socket must not end in a reset.

    Closing a socket with unread data makes the kernel send a reset, and a broker then drops
    the acknowledgements it had not read yet: they came again as duplicates (a SIGTERM under
    load left 132). The stop half-closes after its acks and DISCONNECT and reads on until the
    broker closes. Both transports: paho's disconnect closes the socket once the DISCONNECT is
    written (the same reset, "Broken pipe" in Mosquitto's log).
    """
    flood = b"".join(_publish(None, b"x" * 1000) for _ in range(10_000))  # QoS 0: no window
    hooks, faults = Hooks(), Faults()
    with FakeBroker(accept(lambda conn: flood if conn == 0 else b"")) as broker:
        session = Session(BrokerTarget(broker.address), "ingest-test", receive_maximum=100)
        ingest = kind(session, ["devices/+/#"], hooks)
        pipeline = _pipeline(store, faults, ingest.ack)
        with Running(ingest, pipeline):
            wait_until(lambda: pipeline.counters.stored > 0, 20, "the flood arriving")
        wait_until(lambda: broker.ended == [0], 10, "the broker's side to end")
        assert broker.resets == [], "the stop reset the connection"
        assert isinstance(broker.got[0][-1], mqtt5.DisconnectPacket)


def test_a_full_hold_pauses_reading_and_resumes_when_storage_works(
    broker: Broker, store: Store, data_dir: Path, unique: str
) -> None:
    """QoS 0 has no broker window: past the hold's limit, reading stops until storage is back."""
    faults, hooks = Faults(failing=True), Hooks()
    ingest = _ingest(BrokerAddress("127.0.0.1", broker.port), hooks, f"devices/{unique}/#")
    pipeline = _pipeline(store, faults, ingest.ack, batch_max=20)  # holds 200 at most
    ingest.connect(pipeline, [])
    sent = [Sent(f"devices/{unique}/t", b"%04d" % i + b"x" * 1000, qos=0) for i in range(2000)]
    with Running(ingest, pipeline):
        publish(broker, sent)
        wait_until(lambda: ingest.paused, 20, "reading to pause")
        held = pipeline.pending
        assert pipeline.can_hold() is False
        retried = faults.calls["write_failed"]
        wait_until(lambda: faults.calls["write_failed"] > retried, 20, "one more retry")
        assert pipeline.pending == held, "nothing is read while paused"
        assert ingest.connected, "the connection stays"
        faults.failing = False
        wait_until(lambda: pipeline.counters.stored == len(sent), 40, "every message stored")
        assert not ingest.paused
    stored = [m.record.payload for m in read_all(data_dir)[unique]]
    assert stored == [m.payload for m in sent], "in order, none lost"
    assert hooks.disconnects == []


# ---- choosing the transport ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ({}, {}, AsyncIngest),
        ({"protocol": "3.1.1"}, {}, PahoIngest),
        ({"transport": "paho"}, {}, PahoIngest),
        ({}, {"MQTT_BACKUP_TRANSPORT": "Paho"}, PahoIngest),
        ({"transport": "asyncio"}, {"MQTT_BACKUP_TRANSPORT": "paho"}, AsyncIngest),
    ],
)
def test_the_transport_is_asyncio_on_mqtt_5_unless_told(
    data_dir: Path, flags: dict[str, str], env: dict[str, str], expected: type
) -> None:
    settings = config.load({"data": data_dir, "partitions": 1, **flags}, env)
    bridge = Bridge(settings)
    try:
        assert type(bridge._transport) is expected
    finally:
        bridge.store.close()


def test_asyncio_with_mqtt_311_is_a_usage_error() -> None:
    with pytest.raises(ConfigError) as wrong:
        config.load({"transport": "asyncio"}, {"MQTT_BACKUP_PROTOCOL": "3.1.1"})
    assert wrong.value.exit_code == 2
    assert wrong.value.message() == (
        "bad configuration: --transport asyncio speaks MQTT 5 only. "
        "Try: use --transport paho for MQTT 3.1.1"
    )
    with pytest.raises(ConfigError, match="MQTT_BACKUP_TRANSPORT: must be asyncio or paho"):
        config.load({}, {"MQTT_BACKUP_TRANSPORT": "aiomqtt"})


@pytest.mark.parametrize("kind", [AsyncIngest, PahoIngest])
def test_no_local_is_never_set_on_a_shared_subscription(
    store: Store, kind: type[AsyncIngest | PahoIngest]
) -> None:
    """MQTT-3.8.3-4: Mosquitto 2.0 tolerates it, EMQX and HiveMQ may disconnect."""
    with FakeBroker(accept()) as broker:
        session = Session(BrokerTarget(broker.address), "share-test")
        ingest = kind(session, ["devices/+/#", "$share/g/tele/+/x"], Hooks())
        pipeline = _pipeline(store, Faults(), ingest.ack)
        ingest.connect(pipeline, [])
        stopped = threading.Event()
        stopped.set()
        ingest.run(pipeline, stopped)  # stops at once: commit, disconnect
    subscribe = next(p for p in broker.got[0] if isinstance(p, mqtt5.SubscribePacket))
    no_local = {f.pattern: f.no_local for f in subscribe.topic_filters}
    assert no_local == {"devices/+/#": True, "$share/g/tele/+/x": False}


def test_a_commit_longer_than_the_keepalive_does_not_condemn_a_live_broker(store: Store) -> None:
    """Silence while our own fsync blocks is ours: only an unanswered PINGREQ counts."""
    hooks = Hooks()
    with FakeBroker(accept(lambda _conn: _publish(1, b"slow"))) as broker:
        ingest = _ingest(broker.address, hooks, keepalive=1)
        pipeline = _pipeline(store, Faults(write_delay_s=2.0), ingest.ack)  # 2 keepalives

        def pings() -> int:
            return sum(isinstance(p, mqtt5.PingReqPacket) for p in broker.got[0])

        with Running(ingest, pipeline):
            wait_until(lambda: broker.pubacks(0) == [1], 20, "the slow commit's ack")
            after = pings()
            wait_until(lambda: pings() >= after + 2, 20, "two more pings answered")
    assert hooks.disconnects == []
    assert len(broker.got) == 1, "one connection throughout"


# ---- the commit in a worker thread --------------------------------------------------------------


class GatedStore(FaultyStore):
    """Every write waits for `gate` first: a synced write as slow as the test wants."""

    def __init__(self, inner: Store, faults: Faults) -> None:
        super().__init__(inner, faults)
        self.gate = threading.Event()
        self.writing = threading.Event()

    def write(
        self, partition: str, items: Sequence[Pending], prepared: object | None = None
    ) -> None:
        self.writing.set()
        assert self.gate.wait(60), "the test never opened the gate"
        super().write(partition, items, prepared)


@contextlib.contextmanager
def _opened_at_last(gated: GatedStore) -> Iterator[None]:
    """Open the gate when the block ends, however it ends (the transport can then stop)."""
    try:
        yield
    finally:
        gated.gate.set()


def _gated(store: Store, faults: Faults, ack: AckCallback) -> tuple[CommitPipeline, GatedStore]:
    gated = GatedStore(store, faults)
    router = Router([parse_template("devices/{device}/#")], "backup")
    return CommitPipeline(gated, router, ack, batch_max=50, batch_ms=10), gated


def test_reading_goes_on_while_a_commit_writes_and_acks_wait_for_its_write(
    store: Store, data_dir: Path
) -> None:
    """One commit in flight; what arrives meanwhile is the next batch, acked after its own write."""
    with FakeBroker(accept(lambda _conn: _publish(1, b"m1"))) as broker:
        ingest = _ingest(broker.address, Hooks())
        pipeline, gated = _gated(store, Faults(), ingest.ack)
        with Running(ingest, pipeline), _opened_at_last(gated):
            assert gated.writing.wait(20), "the first commit to start"
            broker.push(0, _publish(2, b"m2") + _publish(3, b"m3"))
            wait_until(lambda: pipeline.pending == 3, 20, "m2 and m3 read during the commit")
            assert pipeline.committing
            assert broker.pubacks(0) == [], "nothing acknowledged before its write returned"
            gated.gate.set()
            wait_until(lambda: len(broker.pubacks(0)) == 3, 20, "every ack")
            assert pipeline.counters.batches == 2, "m1 alone, then m2 and m3 in one commit"
    assert broker.pubacks(0) == [1, 2, 3], "in receive order, batch after batch"
    assert [m.record.payload for m in read_all(data_dir)["d1"]] == [b"m1", b"m2", b"m3"]


def test_a_failed_commit_in_flight_holds_its_messages_ahead_of_the_next(
    store: Store, data_dir: Path
) -> None:
    """Nothing of a failed commit is acknowledged; its messages are stored first once it works."""
    faults = Faults(failing=True)
    with FakeBroker(accept(lambda _conn: _publish(1, b"m1"))) as broker:
        ingest = _ingest(broker.address, Hooks())
        pipeline, gated = _gated(store, faults, ingest.ack)
        with Running(ingest, pipeline), _opened_at_last(gated):
            assert gated.writing.wait(20), "the first commit to start"
            broker.push(0, _publish(2, b"m2"))
            wait_until(lambda: pipeline.pending == 2, 20, "m2 read during the commit")
            gated.gate.set()
            wait_until(lambda: ingest.stall.active, 20, "the failed commit to stall ingest")
            assert pipeline.pending == 2
            assert broker.pubacks(0) == []
            faults.failing = False
            wait_until(lambda: broker.pubacks(0) == [1, 2], 20, "both acks after the retry")
    assert [m.record.payload for m in read_all(data_dir)["d1"]] == [b"m1", b"m2"]


class RecordingBeside:
    """A `Beside` that records its calls; fault injection: `start` raises when told to."""

    def __init__(self, fail_start: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_start = fail_start
        self.chunk_done = threading.Event()
        self._go = threading.Event()

    async def start(self) -> None:
        self.calls.append("start")
        if self.fail_start:
            raise OSError("the control socket cannot listen (injected)")

    def start_chunk(self) -> None:
        """A restore's chunk read in the default executor, running on past the stop."""

        def chunk() -> None:
            self._go.wait(10)
            time.sleep(0.05)  # the read itself, after the restore was cancelled
            self.chunk_done.set()

        asyncio.get_running_loop().run_in_executor(None, chunk)

    async def settle(self) -> None:
        self.calls.append("settle")

    async def stop(self) -> None:
        self.calls.append("stop")
        self._go.set()


def _disconnected(broker: FakeBroker) -> bool:
    return any(isinstance(p, mqtt5.DisconnectPacket) for p in broker.got[0])


def test_a_beside_that_fails_to_start_still_gets_the_shutdown_in_order(store: Store) -> None:
    hooks, faults = Hooks(), Faults()
    beside = RecordingBeside(fail_start=True)
    with FakeBroker(accept()) as broker:
        ingest = _ingest(broker.address, hooks)
        pipeline = _pipeline(store, faults, ingest.ack)
        ingest.connect(pipeline, [])
        with pytest.raises(OSError, match="injected"):
            ingest.run(pipeline, threading.Event(), beside)
        wait_until(lambda: _disconnected(broker), 10, "the DISCONNECT of the shutdown")
    assert beside.calls == ["start", "settle", "stop"]


def test_run_returns_only_once_the_default_executor_is_done(store: Store) -> None:
    # loop.close() does not wait for the default executor: a restore's chunk read queued or
    # running there went on after the store was closed.
    hooks, faults = Hooks(), Faults()

    class Chunking(RecordingBeside):
        async def start(self) -> None:
            await super().start()
            self.start_chunk()

    beside = Chunking()
    stop = threading.Event()
    stop.set()  # straight to the shutdown
    with FakeBroker(accept()) as broker:
        ingest = _ingest(broker.address, hooks)
        pipeline = _pipeline(store, faults, ingest.ack)
        ingest.connect(pipeline, [])
        ingest.run(pipeline, stop, beside)
        assert beside.chunk_done.is_set()
    assert beside.calls == ["start", "settle", "stop"]


def test_nothing_after_a_failure_in_one_read_is_offered(store: Store, data_dir: Path) -> None:
    # The broker's DISCONNECT ends the connection: a message behind it in the same read is
    # not the dead connection's to store (it comes again, on the next one).
    disconnect = mqtt5.DisconnectPacket().write()
    burst = _publish(1, b"before") + disconnect + _publish(2, b"after")
    hooks, faults = Hooks(), Faults()
    with FakeBroker(accept(lambda conn: burst if conn == 0 else b"")) as broker:
        ingest = _ingest(broker.address, hooks)
        pipeline = _pipeline(store, faults, ingest.ack)
        with Running(ingest, pipeline):
            wait_until(lambda: len(broker.got) >= 2, 20, "a reconnect after the DISCONNECT")
            wait_until(lambda: pipeline.pending == 0, 20, "what was offered to be stored")
    stored = [m.record.payload for m in read_all(data_dir).get("d1", [])]
    assert stored == [b"before"]


@pytest.mark.parametrize("transport", [AsyncIngest, PahoIngest])
def test_a_stop_while_a_reconnect_waits_for_the_connack_is_seen_at_once(
    store: Store, monkeypatch: pytest.MonkeyPatch, transport: type[AsyncIngest | PahoIngest]
) -> None:
    # Connection 0 is told to go; connection 1 is closed right behind its SUBACK; connection 2's
    # CONNECT is never answered. Before: paho took connection 1 for up (its disconnect came
    # while the handshake ran, and nothing looked again) and sat on a dead socket for good; and
    # on either transport a stop waited for the whole CONNACK wait of connection 2 (SIGTERM took
    # up to ~15 s). That wait is made far longer here than Running's patience, so only a stop
    # seen during it passes.
    monkeypatch.setattr(async_ingest, "CONNECT_TIMEOUT_S", 600.0)
    monkeypatch.setattr(paho_ingest, "CONNECT_TIMEOUT_S", 600.0)

    def script(conn: int, packet: mqtt5.Packet) -> Answer | None:
        if conn == 1 and isinstance(packet, mqtt5.SubscribePacket):
            return _suback(packet), True  # and hang up
        if conn <= 1:
            return accept()(conn, packet)
        return None  # the CONNECT of every later connection goes unanswered

    hooks = Hooks()
    with FakeBroker(script) as broker:
        session = Session(BrokerTarget(broker.address), "ingest-test", receive_maximum=100)
        ingest = transport(session, ["devices/+/#"], hooks)
        pipeline = _pipeline(store, Faults(), ingest.ack)
        ingest.connect(pipeline, [])
        with Running(ingest, pipeline):
            going = mqtt5.DisconnectPacket(
                reason_code=mqtt5.DisconnectReasonCode.SERVER_SHUTTING_DOWN
            )
            broker.push(0, going.write())
            wait_until(lambda: len(broker.got) >= 3 and broker.got[2] != [], 20, "connection 2")
    assert isinstance(broker.got[2][0], mqtt5.ConnectPacket)
    assert len(broker.got) == 3


@pytest.mark.parametrize("transport", [AsyncIngest, PahoIngest])
def test_a_failed_reconnect_says_why_in_one_plain_line(
    store: Store, caplog: pytest.LogCaptureFixture, transport: type[AsyncIngest | PahoIngest]
) -> None:
    # It said "broker mqtt://X unreachable (cannot reach the broker: mqtt://X: Connect call
    # failed ('127.0.0.1', P)); retrying in 0.6s": the address three times, asyncio's words.
    broker = FakeBroker(accept()).__enter__()
    session = Session(BrokerTarget(broker.address), "ingest-test", receive_maximum=100)
    ingest = transport(session, ["devices/+/#"], Hooks())
    pipeline = _pipeline(store, Faults(), ingest.ack)
    ingest.connect(pipeline, [])
    with caplog.at_level(logging.WARNING), Running(ingest, pipeline):
        going = mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.SERVER_SHUTTING_DOWN)
        broker.push(0, going.write())
        broker.__exit__(None, None, None)  # and nobody listens there any more
        # (The first tries may still reach the closing listener: "closed the connection".)
        wait_until(lambda: "Connection refused" in caplog.text, 20, "a refused reconnect")
    line = next(r.getMessage() for r in caplog.records if "refused" in r.getMessage())
    said = f"cannot reach the broker: {broker.address}: Connection refused; retrying in "
    assert line.startswith(said), line
