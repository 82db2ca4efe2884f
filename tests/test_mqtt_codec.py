"""The codec connection (mqtt_backup.mqtt.codec) against a real Mosquitto, and its edge cases.

What a real broker will not do on demand (refuse a subscription, send garbage, go silent) comes
from a small scripted broker in this file that speaks through the same `mqtt5` codec.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import mqtt5
import pytest

from mqtt_backup.config import BrokerAddress, BrokerTarget, ProtocolVersion, parse_broker_url
from mqtt_backup.errors import BrokerError, BrokerRefused, BrokerUnreachable
from mqtt_backup.mqtt import CodecConnection, Delivery, TlsFiles, codec, packets, session, v311
from mqtt_backup.mqtt.codec import CONNECTION_LOST
from mqtt_backup.mqtt.packets import Outgoing, encode_properties, encode_user
from mqtt_backup.records import Properties
from mqtt_backup.status import ClientIdCheck, Identity
from tests.conftest import BRIDGE_PASSWORD, BRIDGE_USER, Broker
from tools.devbroker import free_port

PROTOCOLS = ["5", "3.1.1"]


def _address(broker: Broker, user: str | None = None, password: str | None = None) -> BrokerAddress:
    base = parse_broker_url(broker.url)
    return BrokerAddress(base.host, base.port, base.tls, user, password)


def _target(broker: Broker, protocol: str = "5") -> BrokerTarget:
    return BrokerTarget(_address(broker), ProtocolVersion(protocol))


async def _collect(conn: CodecConnection, count: int) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(20):
        while len(got) < count:
            batch = await conn.receive()
            got += batch
            conn.ack(batch)
    return got


async def _receive_forever(conn: CodecConnection, into: list[Delivery]) -> None:
    async with asyncio.timeout(20):
        while True:
            into += await conn.receive()


# ---- against Mosquitto --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_round_trip_in_order_with_properties(broker: Broker, unique: str, protocol: str) -> None:
    topic = f"codec/{unique}/t"
    props = Properties(
        correlation_data=b"\x00corr", user=(("k", "v"),), content_type="x/y", response_topic="r/t"
    )

    async def scenario() -> list[Delivery]:
        async with (
            CodecConnection(_target(broker, protocol)) as sub,
            CodecConnection(_target(broker, protocol)) as pub,
        ):
            await sub.subscribe([topic], qos=1)
            for i in range(300):
                await pub.publish(topic, b"%d" % i, qos=i % 2, props=props)
            return await _collect(sub, 300)

    got = asyncio.run(scenario())
    assert [d.payload for d in got] == [b"%d" % i for i in range(300)]
    assert [d.qos for d in got] == [i % 2 for i in range(300)]
    assert all(d.packet_id is not None for d in got if d.qos == 1)
    first = got[0]
    if protocol == "5":
        assert (first.correlation_data, first.user) == (b"\x00corr", (("k", "v"),))
        assert (first.content_type, first.response_topic) == ("x/y", "r/t")
    else:
        assert (first.correlation_data, first.user) == (None, ())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nothing_past_the_window_until_acknowledged(
    broker: Broker, unique: str, protocol: str
) -> None:
    # MQTT 5: our Receive Maximum (5); 3.1.1 has none, so the broker's inflight window (1000 in
    # dev.conf) is the bound there: with 1,005 messages the same property shows.
    window = 5 if protocol == "5" else 1000
    total = window + 5
    topic = f"codec/{unique}/w"

    async def scenario() -> tuple[int, list[Delivery]]:
        async with (
            CodecConnection(_target(broker, protocol), receive_max=5) as sub,
            CodecConnection(_target(broker)) as pub,
        ):
            await sub.subscribe([topic], qos=1)
            for i in range(total):
                await pub.publish(topic, b"%d" % i, qos=1)
            held: list[Delivery] = []
            async with asyncio.timeout(20):
                while len(held) < window:
                    held += await sub.receive(10_000)
            # A negative can only be shown over some time: nothing more arrives unacknowledged.
            with contextlib.suppress(TimeoutError):
                held += await asyncio.wait_for(sub.receive(10_000), 0.5)
            unacked = len(held)
            sub.ack(held)
            return unacked, held + await _collect(sub, total - len(held))

    unacked, got = asyncio.run(scenario())
    assert unacked == window
    assert [d.payload for d in got] == [b"%d" % i for i in range(total)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_user_and_password(auth_broker: Broker, unique: str, protocol: str) -> None:
    async def connect(password: str) -> None:
        address = _address(auth_broker, BRIDGE_USER, password)
        async with CodecConnection(BrokerTarget(address, ProtocolVersion(protocol))) as conn:
            await conn.subscribe([f"codec/{unique}/#"])

    asyncio.run(connect(BRIDGE_PASSWORD))
    with pytest.raises(BrokerRefused) as refused:
        asyncio.run(connect("wrong"))
    assert "check the user name and password" in refused.value.message()
    assert BRIDGE_PASSWORD not in refused.value.message()


def test_tls_needs_the_ca(tls_broker: Broker, unique: str) -> None:
    async def connect(files: TlsFiles) -> None:
        async with CodecConnection(BrokerTarget(_address(tls_broker), tls_files=files)) as conn:
            await conn.subscribe([f"codec/{unique}/#"])
            await conn.publish(f"codec/{unique}/x", b"over TLS")

    asyncio.run(connect(TlsFiles(ca=str(tls_broker.state_dir / "ca.crt"))))
    with pytest.raises(BrokerUnreachable) as unverified:
        asyncio.run(connect(TlsFiles()))
    assert "check --ca" in unverified.value.message()


def test_nobody_listening_is_unreachable() -> None:
    async def connect() -> None:
        async with CodecConnection(BrokerTarget(BrokerAddress("127.0.0.1", free_port()))):
            pass

    with pytest.raises(BrokerUnreachable) as unreachable:
        asyncio.run(connect())
    assert "check --broker and that the broker runs" in unreachable.value.message()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_cancellation_that_comes_with_the_connack_is_not_swallowed(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    """A stop while connecting stops the connect, even when the CONNACK arrives at that moment.

    `asyncio.wait_for` (3.11, cpython gh-86296) returned the CONNACK and dropped the
    cancellation: the connection went on as if nobody had asked it to stop. The fault injected:
    the task is cancelled in the very callback that hands the CONNACK over.
    """
    connecting: list[asyncio.Task[None]] = []
    dispatch = codec._Wire._dispatch

    def dispatch_then_cancel(wire: codec._Wire, packet: mqtt5.Packet) -> None:
        dispatch(wire, packet)
        if isinstance(packet, mqtt5.ConnAckPacket):
            connecting[0].cancel()

    monkeypatch.setattr(codec._Wire, "_dispatch", dispatch_then_cancel)
    entered = False

    async def connect() -> None:
        nonlocal entered
        async with CodecConnection(_target(broker, protocol)):
            entered = True

    async def scenario() -> bool:
        connecting.append(asyncio.create_task(connect()))
        await asyncio.wait(connecting)
        return connecting[0].cancelled()

    assert asyncio.run(scenario()), "the cancellation was swallowed"
    assert not entered


def test_broker_gone_mid_stream_hands_out_what_arrived_then_a_clear_error(
    own_broker: Broker, unique: str
) -> None:
    topic = f"codec/{unique}/gone"

    async def scenario() -> tuple[list[Delivery], BrokerError]:
        got: list[Delivery] = []
        async with (
            CodecConnection(_target(own_broker)) as sub,
            CodecConnection(_target(own_broker)) as pub,
        ):
            await sub.subscribe([topic])
            for i in range(3):
                await pub.publish(topic, b"%d" % i)
            got += await _collect(sub, 3)
            own_broker.stop()
            with pytest.raises(BrokerError) as lost:
                await _receive_forever(sub, got)
        return got, lost.value

    got, error = asyncio.run(scenario())
    assert [d.payload for d in got] == [b"0", b"1", b"2"]
    assert isinstance(error, BrokerUnreachable)
    assert "\n" not in error.message()
    assert "closed the connection" in error.message() or "lost" in error.message()


# ---- a scripted broker for what Mosquitto will not do on demand ---------------------------------

Script = Callable[[mqtt5.Packet, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_broker(script: Script) -> AsyncIterator[BrokerTarget]:
    """A TCP server that parses MQTT 5 packets and lets `script` answer each."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                buffer += chunk
                while buffer:
                    try:
                        packet, size = mqtt5.read(memoryview(buffer))
                    except IndexError:
                        break
                    buffer = buffer[size:]
                    await script(packet, writer)
        writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield BrokerTarget(BrokerAddress("127.0.0.1", port))
    finally:
        server.close()


async def connack_then(
    packet: mqtt5.Packet, writer: asyncio.StreamWriter, answer: Callable[[mqtt5.Packet], bytes]
) -> None:
    """Accept the connection; hand every later packet to `answer`."""
    if isinstance(packet, mqtt5.ConnectPacket):
        writer.write(mqtt5.ConnAckPacket().write())
    elif not isinstance(packet, mqtt5.PingReqPacket | mqtt5.DisconnectPacket):
        writer.write(answer(packet))


def _suback_refused(packet: mqtt5.Packet) -> bytes:
    assert isinstance(packet, mqtt5.SubscribePacket)
    codes = [
        mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,
        mqtt5.SubAckReasonCode.NOT_AUTHORIZED,
    ]
    return mqtt5.SubAckPacket(packet.packet_id, codes).write()


def _run_scripted(
    answer: Callable[[mqtt5.Packet], bytes], work: Callable[..., Awaitable[None]]
) -> None:
    async def scenario() -> None:
        async with (
            scripted_broker(lambda p, w: connack_then(p, w, answer)) as address,
            CodecConnection(address) as conn,
        ):
            await work(conn)

    asyncio.run(scenario())


def test_a_refused_subscription_names_the_filter() -> None:
    async def work(conn: CodecConnection) -> None:
        await conn.subscribe(["ok/#", "secret/#"])

    with pytest.raises(BrokerRefused) as refused:
        _run_scripted(_suback_refused, work)
    assert "secret/# (NOT_AUTHORIZED)" in refused.value.message()
    assert "ok/#" not in refused.value.message()


def test_a_refused_publish_says_why() -> None:
    def refuse(packet: mqtt5.Packet) -> bytes:
        assert isinstance(packet, mqtt5.PublishPacket)
        assert packet.packet_id is not None
        code = mqtt5.PubAckReasonCode.NOT_AUTHORIZED
        return mqtt5.PubAckPacket(packet.packet_id, reason_code=code).write()

    async def work(conn: CodecConnection) -> None:
        await conn.publish("a/b", b"x", qos=1)

    with pytest.raises(BrokerRefused, match=r"publish to a/b refused \(NOT_AUTHORIZED\)"):
        _run_scripted(refuse, work)


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (
            lambda _p: mqtt5.DisconnectPacket(
                reason_code=mqtt5.DisconnectReasonCode.SERVER_SHUTTING_DOWN
            ).write(),
            "the broker closed the connection: SERVER_SHUTTING_DOWN",
        ),
        (lambda _p: b"\xf0\x00", "malformed packet from the broker"),
    ],
)
def test_disconnect_or_garbage_mid_stream_is_a_clear_error(
    answer: Callable[[mqtt5.Packet], bytes], words: str
) -> None:
    async def work(conn: CodecConnection) -> None:
        await conn.subscribe(["a/#"])
        await asyncio.wait_for(conn.receive(), 10)

    with pytest.raises(BrokerError) as failed:
        _run_scripted(answer, work)
    assert words in failed.value.message()


@pytest.mark.parametrize(
    ("connack", "error", "words"),
    [
        (b"\x20\x02\x00\x01", BrokerRefused, "try --protocol 3.1.1"),  # a 3.1.1-only broker
        (
            mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.NOT_AUTHORIZED).write(),
            BrokerRefused,
            "not authorized. Try: check the user name and password",
        ),
        (
            mqtt5.ConnAckPacket(
                reason_code=mqtt5.ConnAckReasonCode.USE_ANOTHER_SERVER,
                server_reference="other:1883",
            ).write(),
            BrokerRefused,
            "Try: connect to other:1883 instead",
        ),
    ],
)
def test_a_refused_connection_gives_a_hint(
    connack: bytes, error: type[BrokerError], words: str
) -> None:
    async def answer(packet: mqtt5.Packet, writer: asyncio.StreamWriter) -> None:
        if isinstance(packet, mqtt5.ConnectPacket):
            writer.write(connack)

    async def scenario() -> None:
        async with scripted_broker(answer) as address, CodecConnection(address):
            pass

    with pytest.raises(error) as refused:
        asyncio.run(scenario())
    assert words in refused.value.message()


def test_a_silent_broker_is_noticed_by_the_keepalive() -> None:
    async def no_pong(packet: mqtt5.Packet, writer: asyncio.StreamWriter) -> None:
        if isinstance(packet, mqtt5.ConnectPacket):
            writer.write(mqtt5.ConnAckPacket().write())

    async def scenario() -> None:
        async with scripted_broker(no_pong) as address, CodecConnection(address, keepalive=1) as c:
            await asyncio.wait_for(c.receive(), 30)

    with pytest.raises(BrokerUnreachable, match="no answer for"):
        asyncio.run(scenario())


def test_a_broker_that_never_answers_the_connect_gets_a_hint_and_one_try(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A port that takes TCP and says nothing (not an MQTT listener): the start-up's client-id
    # check connected a second time after the first CONNACK wait ran out, and the one line said
    # "no CONNACK ... in time" with nothing to try (20 s to that exit, not 10).
    monkeypatch.setattr(codec, "CONNECT_TIMEOUT_S", 0.3)
    monkeypatch.setattr(session, "CONNECT_TIMEOUT_S", 0.3)
    connects: list[mqtt5.Packet] = []

    async def silent(packet: mqtt5.Packet, _writer: asyncio.StreamWriter) -> None:
        connects.append(packet)

    async def scenario() -> None:
        async with scripted_broker(silent) as address:
            check = ClientIdCheck(address, Identity("backup", "bridge-1", None, None), 60)
            await asyncio.to_thread(check.result)  # the store opened first, as it usually does

    with pytest.raises(BrokerUnreachable) as caught:
        asyncio.run(scenario())
    assert "no CONNACK from" in caught.value.message()
    assert "names an MQTT listener" in caught.value.message()
    assert len(connects) == 1


# ---- the MQTT 3.1.1 codec -----------------------------------------------------------------------


def _parsed(data: bytes) -> mqtt5.Packet:
    packet, size = v311.read(memoryview(data))
    assert size == len(data)
    return packet


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 2_097_152])
def test_v311_publish_round_trips_at_every_length_boundary(size: int) -> None:
    sent = mqtt5.PublishPacket(
        "a/ü", b"\xff" * size, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=513, retain=True
    )
    data = v311.write(sent)
    with pytest.raises(IndexError):
        v311.read(memoryview(data[:-1]))
    got, used = v311.read(memoryview(data + b"\xd0\x00"))  # the next packet stays
    assert used == len(data)
    assert isinstance(got, mqtt5.PublishPacket)
    assert (got.topic, got.payload, got.packet_id, got.retain) == ("a/ü", sent.payload, 513, True)


def test_v311_reads_the_broker_packets_and_refuses_garbage() -> None:
    connack = _parsed(b"\x20\x02\x01\x04")
    assert isinstance(connack, mqtt5.ConnAckPacket)
    assert connack.session_present
    assert connack.reason_code == mqtt5.ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD
    suback = _parsed(b"\x90\x04\x00\x07\x01\x80")
    assert isinstance(suback, mqtt5.SubAckPacket)
    assert suback.reason_codes == [
        mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,
        mqtt5.SubAckReasonCode.UNSPECIFIED_ERROR,
    ]
    assert isinstance(_parsed(b"\xd0\x00"), mqtt5.PingRespPacket)
    for garbage in (b"\xf0\x00", b"\x20\x02\x00\x09", b"\x36\x00", b"\x30\xff\xff\xff\xff\x01"):
        with pytest.raises(ValueError):  # noqa: PT011 - the codec's own contract, like mqtt5's
            v311.read(memoryview(garbage))


def test_v311_refuses_what_it_cannot_say() -> None:
    will = mqtt5.Will("status", payload=b"offline")
    with pytest.raises(ValueError, match="no last will"):
        v311.write(mqtt5.ConnectPacket("c", will=will))
    with pytest.raises(ValueError, match="does not send"):
        v311.write(mqtt5.AuthPacket())


# ---- pre-encoded publishes and the shared window -----------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100, 127 - 20, 128, 16_383, 16_384, 2_097_152])
@pytest.mark.parametrize(("qos", "retain"), [(0, False), (1, False), (1, True)])
def test_outgoing_reads_back_as_it_was_built(size: int, qos: int, retain: bool) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    props = encode_properties(
        correlation_data=b"\x00c",
        user=(("k", "v"), ("ü", "😀")),
        content_type="application/json",
        payload_format=1,
        message_expiry=60,
        response_topic="r/t",
    ) + encode_user([("more", "x")])
    outgoing = Outgoing("a/ü/b", payload, qos, retain, props)
    data = outgoing.encode(513 if qos else None)
    assert outgoing.size() == len(data)
    packet, used = mqtt5.read(memoryview(data))
    assert used == len(data)
    assert isinstance(packet, mqtt5.PublishPacket)
    assert (packet.topic, packet.payload, int(packet.qos), packet.retain) == (
        "a/ü/b",
        payload,
        qos,
        retain,
    )
    assert packet.packet_id == (513 if qos else None)
    assert packet.user_properties == [("k", "v"), ("ü", "😀"), ("more", "x")]
    assert (packet.correlation_data, packet.content_type, packet.response_topic) == (
        b"\x00c",
        "application/json",
        "r/t",
    )
    assert (packet.payload_format_indicator, packet.message_expiry_interval) == (1, 60)
    old = outgoing.encode(7, mqtt5_on=False)  # MQTT 3.1.1: no properties
    assert outgoing.size(mqtt5_on=False) == len(old)
    assert _parsed(old) == v311.read(memoryview(old))[0]


@pytest.mark.parametrize("size", [0, 1, 100, 127 - 20, 128, 16_383, 16_384, 2_097_152])
def test_a_packet_encoded_as_it_is_built_is_the_same_packet(size: int) -> None:
    # A restore's JSON answers are encoded when built (qos1_builder), their leading bytes kept
    # per length: the same bytes and size as the packet encoded at write time, every length.
    props = encode_properties(correlation_data=b"\x00c") + encode_user([("k", "ü")])
    build = packets.qos1_builder("a/ü/b", props)
    for payload in (bytes(size), b"x" * size, bytes(size)):  # the second one of a length: kept
        built = build(payload)
        plain = Outgoing("a/ü/b", payload, 1, False, props)
        assert built.encode(513) == plain.encode(513)
        assert built.size() == plain.size() == len(plain.encode(513))
        assert built.encode(7, mqtt5_on=False) == plain.encode(7, mqtt5_on=False)
        assert built.size(mqtt5_on=False) == plain.size(mqtt5_on=False)


def test_publish_many_shares_one_window_within_the_receive_maximum() -> None:
    """Two streams of pre-encoded publishes never have more than the broker's Receive Maximum
    awaiting a PUBACK between them; each arrives in order, each PUBACK reaches its stream."""
    receive_max = 5
    pending: list[int] = []
    peak = 0
    arrived: list[bytes] = []

    async def script(packet: mqtt5.Packet, writer: asyncio.StreamWriter) -> None:
        nonlocal peak
        if isinstance(packet, mqtt5.ConnectPacket):
            connack = mqtt5.ConnAckPacket(receive_max=receive_max, max_packet_size=4096)
            writer.write(connack.write())
        elif isinstance(packet, mqtt5.PublishPacket):
            assert packet.packet_id is not None
            pending.append(packet.packet_id)
            arrived.append(packet.payload)
            peak = max(peak, len(pending))
            if len(pending) == receive_max:  # acknowledge a full window at once, later
                acks = [mqtt5.PubAckPacket(p).write() for p in pending]
                pending.clear()
                await asyncio.sleep(0.01)
                writer.write(b"".join(acks))

    async def scenario() -> tuple[list[int], list[int], CodecConnection]:
        async with scripted_broker(script) as address, CodecConnection(address) as conn:
            codes: tuple[list[int], list[int]] = ([], [])
            streams = [
                [Outgoing("s/a", b"a%d" % i) for i in range(30)],
                [Outgoing("s/b", b"b%d" % i) for i in range(30)],
            ]
            await asyncio.gather(
                conn.publish_many(streams[0], codes[0].append),
                conn.publish_many(streams[1], codes[1].append),
            )
            async with asyncio.timeout(10):
                while len(codes[0]) + len(codes[1]) < 60:
                    await asyncio.sleep(0.01)
            assert conn.max_packet_size == 4096
            return codes[0], codes[1], conn

    codes_a, codes_b, conn = asyncio.run(scenario())
    assert codes_a == codes_b == [0] * 30
    assert peak == receive_max
    assert conn.send_window > receive_max  # the broker's limit won
    assert [p for p in arrived if p.startswith(b"a")] == [b"a%d" % i for i in range(30)]
    assert [p for p in arrived if p.startswith(b"b")] == [b"b%d" % i for i in range(30)]
    # Both streams were in flight together, not one after the other.
    assert arrived.index(b"b0") < arrived.index(b"a29")


def test_a_lost_connection_reaches_every_publish_awaiting_its_puback() -> None:
    async def script(packet: mqtt5.Packet, writer: asyncio.StreamWriter) -> None:
        if isinstance(packet, mqtt5.ConnectPacket):
            writer.write(mqtt5.ConnAckPacket(receive_max=3).write())
        elif isinstance(packet, mqtt5.PublishPacket):
            writer.close()  # gone before any PUBACK

    async def scenario() -> tuple[list[int], BaseException | None]:
        codes: list[int] = []
        async with scripted_broker(script) as address, CodecConnection(address) as conn:
            packets = [Outgoing("s/a", b"%d" % i) for i in range(10)]
            try:
                await conn.publish_many(packets, codes.append)
            except BrokerError as exc:
                return codes, exc
        return codes, None

    codes, error = asyncio.run(scenario())
    assert isinstance(error, BrokerUnreachable)
    # The first window's worth was written, the rest waited in the queue: every packet handed
    # over hears of the loss, written or not (a stream that queued ahead and returned must too).
    assert codes == [CONNECTION_LOST] * 10


def test_puback_reads_refill_the_window_without_the_publisher_running() -> None:
    """Packets queued ahead go out as PUBACKs arrive, written from the read itself: the
    stream that queued them is busy elsewhere (here: waits for all of them) and never runs."""
    receive_max = 4

    async def script(packet: mqtt5.Packet, writer: asyncio.StreamWriter) -> None:
        if isinstance(packet, mqtt5.ConnectPacket):
            writer.write(mqtt5.ConnAckPacket(receive_max=receive_max).write())
        elif isinstance(packet, mqtt5.PublishPacket):
            assert packet.packet_id is not None
            writer.write(mqtt5.PubAckPacket(packet.packet_id).write())

    async def scenario() -> tuple[list[int], int]:
        codes: list[int] = []
        all_acked = asyncio.Event()

        def acked(code: int) -> None:
            codes.append(code)
            if len(codes) == 50:
                all_acked.set()

        async with scripted_broker(script) as address, CodecConnection(address) as conn:
            packets = [Outgoing("s/a", b"%d" % i) for i in range(50)]
            await conn.publish_many(packets, acked, ahead=50)  # returns at once
            async with asyncio.timeout(10):
                await all_acked.wait()
            return codes, conn.window.peak

    codes, peak = asyncio.run(scenario())
    assert codes == [0] * 50
    assert peak == receive_max


def test_a_stream_queues_at_most_ahead_plus_one_batch() -> None:
    """What a stream holds unwritten is bounded by `ahead` and its batch, however long it is
    and however slow the broker: a million-message restore holds what a small one does."""
    batch, ahead, batches = 16, 16, 40
    queued_seen: list[int] = []
    conn_box: list[CodecConnection] = []

    async def script(packet: mqtt5.Packet, writer: asyncio.StreamWriter) -> None:
        if isinstance(packet, mqtt5.ConnectPacket):
            writer.write(mqtt5.ConnAckPacket(receive_max=3).write())
        elif isinstance(packet, mqtt5.PublishPacket):
            assert packet.packet_id is not None
            queued_seen.append(conn_box[0].queued)
            await asyncio.sleep(0.001)  # a slow subscriber's broker: the PUBACKs come late
            writer.write(mqtt5.PubAckPacket(packet.packet_id).write())

    async def scenario() -> tuple[list[int], list[int]]:
        codes: list[int] = []
        on_return: list[int] = []
        async with scripted_broker(script) as address, CodecConnection(address) as conn:
            conn_box.append(conn)
            for b in range(batches):
                packets = [Outgoing("s/a", b"%d" % (b * batch + i)) for i in range(batch)]
                await conn.publish_many(packets, codes.append, ahead=ahead)
                on_return.append(conn.queued)
            async with asyncio.timeout(20):
                while len(codes) < batch * batches:
                    await asyncio.sleep(0.01)
        return on_return, codes

    on_return, codes = asyncio.run(scenario())
    assert codes == [0] * (batch * batches)
    assert max(on_return) <= ahead
    assert max(queued_seen) <= ahead + batch


def test_a_cancelled_stream_writes_nothing_more() -> None:
    """A stream abandoned while its packets wait for room: they never go out, and the room its
    written ones free goes to others."""
    arrived: list[bytes] = []
    held: list[int] = []
    writers: list[asyncio.StreamWriter] = []

    async def script(packet: mqtt5.Packet, writer: asyncio.StreamWriter) -> None:
        if isinstance(packet, mqtt5.ConnectPacket):
            writers.append(writer)
            writer.write(mqtt5.ConnAckPacket(receive_max=2).write())
        elif isinstance(packet, mqtt5.PublishPacket):
            assert packet.packet_id is not None
            arrived.append(packet.payload)
            if packet.topic == "s/a":
                held.append(packet.packet_id)  # acknowledged only when the test says so
            else:
                writer.write(mqtt5.PubAckPacket(packet.packet_id).write())

    async def scenario() -> None:
        async with scripted_broker(script) as address, CodecConnection(address) as conn:
            packets = [Outgoing("s/a", b"a%d" % i) for i in range(10)]
            task = asyncio.create_task(conn.publish_many(packets, lambda _code: None))
            async with asyncio.timeout(10):
                while len(held) < 2:
                    await asyncio.sleep(0.001)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert conn.queued == 0
            writers[0].write(b"".join(mqtt5.PubAckPacket(p).write() for p in held))
            # After those PUBACKs, a publish of its own: a withdrawn packet would have been
            # written from the read of the PUBACKs, before this one.
            await conn.publish("s/b", b"after", qos=1)

    asyncio.run(scenario())
    assert arrived == [b"a0", b"a1", b"after"]


def test_qos0_packets_take_no_window_credit_and_count_as_done_at_once() -> None:
    """A stream that mixes QoS 0 (a replay keeps the stored QoS) with QoS 1: no PUBACK comes for
    a QoS 0 publish, so it takes no credit and no packet id, and is done once written. Many
    more QoS 0 packets than the window holds all go out, and the window ends as full as it
    began (a credit lost per QoS 0 message stalled every restore after ~20 of them)."""
    receive_max = 2
    arrived: list[tuple[bytes, int, int | None]] = []

    async def script(packet: mqtt5.Packet, writer: asyncio.StreamWriter) -> None:
        if isinstance(packet, mqtt5.ConnectPacket):
            writer.write(mqtt5.ConnAckPacket(receive_max=receive_max).write())
        elif isinstance(packet, mqtt5.PublishPacket):
            arrived.append((packet.payload, int(packet.qos), packet.packet_id))
            if int(packet.qos):
                assert packet.packet_id is not None
                writer.write(mqtt5.PubAckPacket(packet.packet_id).write())

    qos = [0] * 10 + [1, 0, 1, 1, 0] + [0] * 10

    async def scenario() -> tuple[list[int], int, int]:
        codes: list[int] = []
        async with scripted_broker(script) as address, CodecConnection(address) as conn:
            packets = [Outgoing("s/a", b"%d" % i, q) for i, q in enumerate(qos)]
            async with asyncio.timeout(10):
                await conn.publish_many(packets, codes.append)
                while len(codes) < len(qos) or len(arrived) < len(qos):
                    await asyncio.sleep(0.01)
            assert conn._wire is not None
            return codes, conn.window.free, len(conn._wire.acks)

    codes, free, awaiting = asyncio.run(scenario())
    assert codes == [0] * len(qos)
    assert (free, awaiting) == (receive_max, 0)
    assert [p for p, _, _ in arrived] == [b"%d" % i for i in range(len(qos))]
    assert [(q, pid is None) for _, q, pid in arrived] == [(q, q == 0) for q in qos]
