"""The asyncio transport's hand-written PUBLISH path against the `mqtt5` codec.

`_Wire._parse` reads a QoS 1 PUBLISH without properties itself and hands every other packet to
the codec. Whatever the shape of the packets and however the socket splits them, the sink must
hear exactly what the codec reads: same topic, payload, flags, properties, ack token, in order.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any, Literal

import mqtt5
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_backup.config import BrokerAddress, BrokerTarget
from mqtt_backup.errors import BrokerError
from mqtt_backup.mqtt.async_ingest import AsyncIngest, _properties, _Wire
from mqtt_backup.mqtt.session import REPLAY_PROPERTY, Session
from mqtt_backup.records import Record, stored_parts

GENERATION = 7
# (topic, payload, stored flags, middle bytes of the stored form, ack token, replayed)
Heard = tuple[str, bytes, int, bytes, int | None, bool]


class RecordingSink:
    """Keeps what the wire offers, in the form `records` stores it (what must not change)."""

    def __init__(self) -> None:
        self.heard: list[Heard] = []

    def offer_publishes(
        self,
        topics: Sequence[bytes],
        payloads: Sequence[bytes],
        flags: Sequence[int],
        tokens: Sequence[int],
        received_ns: int,
    ) -> bool:
        assert received_ns > 0
        assert len(topics) == len(payloads) == len(flags) == len(tokens)
        for topic, payload, flag, token in zip(topics, payloads, flags, tokens, strict=True):
            record = Record(topic.decode("utf-8"), payload)
            middle = stored_parts(record)[1]
            self.heard.append((record.topic, payload, flag, middle, token, False))
        return False

    def offer(self, record: Record, token: int | None, replayed: bool = False) -> None:
        flags, middle = stored_parts(record)
        self.heard.append((record.topic, record.payload, flags, middle, token, replayed))

    def full(self) -> bool:
        return False


def expected(packet: mqtt5.PublishPacket) -> Heard:
    """What the codec reads, as the transport offered it before the fast path."""
    props = _properties(packet)
    record = Record(
        packet.topic, packet.payload, int(packet.qos), packet.retain, packet.duplicate, props
    )
    flags, middle = stored_parts(record)
    token = None if packet.packet_id is None else GENERATION << 16 | packet.packet_id
    replayed = props is not None and any(k == REPLAY_PROPERTY for k, _ in props.user)
    return (packet.topic, packet.payload, flags, middle, token, replayed)


def codec_reads(data: bytes) -> mqtt5.PublishPacket:
    """The PUBLISH packet the codec reads from `data`."""
    packet, _ = mqtt5.read(memoryview(data))
    assert isinstance(packet, mqtt5.PublishPacket)
    return packet


def feed(chunks: list[bytes]) -> tuple[list[Heard], _Wire]:
    """Run a wire (not serving: nothing commits) over the chunks, as reads of the socket."""

    async def run() -> tuple[list[Heard], _Wire]:
        session = Session(BrokerTarget(BrokerAddress("127.0.0.1", 1883)), "parse-test")
        sink = RecordingSink()
        ingest = AsyncIngest(session, ["devices/+/#"], hooks=None)  # type: ignore[arg-type]
        wire = _Wire(ingest, sink, GENERATION)  # type: ignore[arg-type]
        for chunk in chunks:
            wire.data_received(chunk)
        return sink.heard, wire

    return asyncio.run(run())


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (as a socket might deliver it)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)  # not encodable: no topic holds one
_text = st.text(st.characters(blacklist_categories=_SURROGATES, blacklist_characters="\x00+#"))
_user = st.lists(st.tuples(_text, _text), max_size=3)


@st.composite
def publishes(draw: Any) -> mqtt5.PublishPacket:
    """Every PUBLISH shape a broker may send a QoS 1 subscriber (QoS 2 is refused elsewhere)."""
    qos = draw(st.sampled_from([0, 1]))
    options: dict[str, Any] = {}
    if draw(st.booleans()):  # properties, or none (the fast path's case)
        options = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "payload_format_indicator": st.sampled_from([0, 1]),
                    "message_expiry_interval": st.integers(0, 2**32 - 1),
                    "content_type": _text,
                    "response_topic": _text.filter(bool),
                    "correlation_data": st.binary(max_size=20),
                    "topic_alias": st.integers(1, 65535),
                    "user_properties": _user,
                    "subscription_ids": st.lists(st.integers(1, 2**28 - 1), max_size=2),
                },
            )
        )
        if draw(st.booleans()):
            replay = [(REPLAY_PROPERTY, "1")]
            options["user_properties"] = options.get("user_properties", []) + replay
    return mqtt5.PublishPacket(
        draw(_text.filter(bool)),
        draw(st.binary(max_size=300)),  # past 127 bytes: a two-byte remaining length
        qos=mqtt5.QoS(qos),
        retain=draw(st.booleans()),
        duplicate=qos > 0 and draw(st.booleans()),
        packet_id=draw(st.integers(1, 65535)) if qos else None,
        **options,
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(publishes(), min_size=1, max_size=8), st.lists(st.integers(0, 10**6)))
def test_the_sink_hears_what_the_codec_reads(
    packets: list[mqtt5.PublishPacket], cuts: list[int]
) -> None:
    stream = b"".join(p.write() for p in packets)
    want = [expected(codec_reads(p.write())) for p in packets]
    heard, wire = feed(split(stream, cuts))
    assert wire.failure is None
    assert heard == want


def test_a_long_payload_takes_a_three_byte_length() -> None:
    packet = mqtt5.PublishPacket(
        "devices/d1/t", b"x" * 20_000, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=9
    )
    heard, _ = feed(split(packet.write(), [1, 2, 3, 4, 100]))
    assert heard == [expected(packet)]


def test_a_topic_that_is_not_utf8_fails_the_connection() -> None:
    good = mqtt5.PublishPacket("devices/d1/t", b"x", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=1)
    bad = good.write().replace(b"d1", b"\xff\xfe")
    heard, wire = feed([good.write() + bad])
    assert heard == [expected(good)]
    assert isinstance(wire.failure, BrokerError)
    assert "malformed packet" in wire.failure.detail


def test_a_remaining_length_over_four_bytes_fails_the_connection() -> None:
    heard, wire = feed([b"\x32\xff\xff\xff\xff\x01"])
    assert heard == []
    assert isinstance(wire.failure, BrokerError)
    assert "malformed packet" in wire.failure.detail


def test_a_qos2_publish_fails_the_connection_unacknowledged() -> None:
    packet = mqtt5.PublishPacket("devices/d1/t", b"x", qos=mqtt5.QoS.EXACTLY_ONCE, packet_id=3)
    heard, wire = feed([packet.write()])
    assert heard == []
    assert isinstance(wire.failure, BrokerError)
    assert "QoS 2" in wire.failure.detail
