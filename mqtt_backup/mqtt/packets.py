"""Outgoing PUBLISH packets encoded ahead of time, all but their packet id.

A restore sends many messages with the same topic and properties: their bytes are built once per
answer (`encode_properties`), each message adds its payload (`Outgoing`), and the connection
splices in a packet id when the window has room. No property object per message (MQTT 5,
section 3.3; on MQTT 3.1.1 the properties are left out).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import mqtt5

from mqtt_backup.records import Properties

_PAYLOAD_FORMAT = 0x01
_MESSAGE_EXPIRY = 0x02
_CONTENT_TYPE = 0x03
_RESPONSE_TOPIC = 0x08
_CORRELATION_DATA = 0x09
_USER_PROPERTY = 0x26


def read5(buffer: memoryview) -> tuple[mqtt5.Packet, int]:
    """`mqtt5.read`, with its panics as ValueError: a malformed packet, like any other.

    mqtt5 0.8.0 panics (pyo3's PanicException, a BaseException that no `except ValueError` or
    `except Exception` sees) on some malformed packets, e.g. a QoS 1 PUBLISH whose topic is not
    UTF-8; out of `data_received`, asyncio logs it with a traceback as a fatal error.
    """
    try:
        return mqtt5.read(buffer)
    except Exception:
        raise
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise ValueError(f"the codec cannot read it ({exc})") from None


def varint(value: int) -> bytes:
    """MQTT's variable byte integer (remaining length, property length)."""
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(text: str) -> bytes:
    # backslashreplace: a lone surrogate in a stored topic or property cannot be UTF-8.
    data = text.encode("utf-8", "backslashreplace")
    return struct.pack("!H", len(data)) + data


def _binary(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def encode_user(pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> bytes:
    """User properties as property bytes (to join with others, any order)."""
    return b"".join(bytes((_USER_PROPERTY,)) + _string(k) + _string(v) for k, v in pairs)


def encode_properties(
    *,
    correlation_data: bytes | None = None,
    user: tuple[tuple[str, str], ...] = (),
    content_type: str | None = None,
    payload_format: int | None = None,
    message_expiry: int | None = None,
    response_topic: str | None = None,
) -> bytes:
    """PUBLISH properties as bytes, without their length (see `Outgoing`)."""
    parts = []
    if payload_format is not None:
        parts.append(bytes((_PAYLOAD_FORMAT, payload_format)))
    if message_expiry is not None:
        parts.append(bytes((_MESSAGE_EXPIRY,)) + struct.pack("!I", message_expiry))
    if content_type is not None:
        parts.append(bytes((_CONTENT_TYPE,)) + _string(content_type))
    if response_topic is not None:
        parts.append(bytes((_RESPONSE_TOPIC,)) + _string(response_topic))
    if correlation_data is not None:
        parts.append(bytes((_CORRELATION_DATA,)) + _binary(correlation_data))
    parts.append(encode_user(user))
    return b"".join(parts)


# Not frozen, though never changed: one is built per restored message, and a frozen dataclass's
# __init__ (object.__setattr__ per field) cost several times a plain one's.
@dataclass(slots=True)
class Outgoing:
    """One PUBLISH, encoded but for its packet id (QoS 1) or ready as it is (QoS 0)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    properties: bytes = b""  # from encode_properties (+ encode_user); ignored on MQTT 3.1.1
    # MQTT 5 only, made with the packet (`qos1_builder`): its bytes before the packet id (fixed
    # header and topic) and its properties with their length; the payload follows them.
    encoded: tuple[bytes, bytes] | None = None

    def encode(self, packet_id: int | None, mqtt5_on: bool = True) -> bytes:
        """The whole packet; `packet_id` for QoS 1."""
        return b"".join(self.parts(packet_id, mqtt5_on))

    def parts(self, packet_id: int | None, mqtt5_on: bool = True) -> tuple[bytes, ...]:
        """The packet as pieces to join (a batch joins all of its packets' pieces at once)."""
        encoded = self.encoded
        if encoded is not None and mqtt5_on:
            return encoded[0], PACKET_ID(packet_id or 0), encoded[1], self.payload
        first, topic, props = _fixed(self.topic, self.qos, self.retain, self.properties, mqtt5_on)
        payload = self.payload
        if not self.qos:
            length = len(topic) + len(props) + len(payload)
            return _head(first, length), topic, props, payload
        length = len(topic) + 2 + len(props) + len(payload)
        return _head(first, length), topic, PACKET_ID(packet_id or 0), props, payload

    def size(self, mqtt5_on: bool = True) -> int:
        """Bytes on the wire, as the broker's Maximum Packet Size counts them."""
        if self.encoded is not None and mqtt5_on:
            return len(self.encoded[0]) + 2 + len(self.encoded[1]) + len(self.payload)
        _, topic, props = _fixed(self.topic, self.qos, self.retain, self.properties, mqtt5_on)
        length = len(topic) + (2 if self.qos else 0) + len(props) + len(self.payload)
        return 1 + _varint_size(length) + length

    def out_props(self) -> Properties:
        """The properties as a value (for a connection that takes them so, e.g. aiomqtt)."""
        packet, _ = mqtt5.read(memoryview(self.encode(1)))
        assert isinstance(packet, mqtt5.PublishPacket)
        return Properties(
            correlation_data=packet.correlation_data,
            user=tuple(packet.user_properties),
            content_type=packet.content_type,
            payload_format=packet.payload_format_indicator or None,
            message_expiry=packet.message_expiry_interval,
            response_topic=packet.response_topic,
        )


PACKET_ID = struct.Struct("!H").pack


def qos1_builder(topic: str, properties: bytes) -> Callable[[bytes], Outgoing]:
    """QoS 1 packets to `topic` with `properties`, each encoded for MQTT 5 as it is built.

    A restore's JSON answer: the topic and properties are encoded once, and the bytes before
    the packet id once per packet length (a small cache): a message adds only its payload, and
    the connection's write the packet id (`Outgoing.parts`).
    """
    first, topic_bytes, props = _fixed(topic, 1, False, properties, True)
    fixed = len(topic_bytes) + 2 + len(props)
    encoded: dict[int, tuple[bytes, bytes]] = {}

    def build(payload: bytes) -> Outgoing:
        length = fixed + len(payload)
        pieces = encoded.get(length)
        if pieces is None:
            pieces = (_head(first, length) + topic_bytes, props)
            if len(encoded) < _LENGTHS_KEPT:
                encoded[length] = pieces
        return Outgoing(topic, payload, 1, False, properties, pieces)

    return build


# Packet lengths whose leading bytes one answer keeps: its messages' sizes, mostly a few dozen.
_LENGTHS_KEPT = 1024


@lru_cache(maxsize=256)
def _fixed(
    topic: str, qos: int, retain: bool, properties: bytes, mqtt5_on: bool
) -> tuple[int, bytes, bytes]:
    # What the messages of one answer share (its topic, its properties), encoded once: a
    # restore's packets differ only in packet id and payload.
    first = 0x30 | (qos << 1) | int(retain)
    props = varint(len(properties)) + properties if mqtt5_on else b""
    return first, _string(topic), props


def _head(first: int, length: int) -> bytes:
    """The fixed header: packet type and flags, then the remaining length."""
    if length < 0x80:
        return bytes((first, length))
    if length < 0x4000:
        return bytes((first, length & 0x7F | 0x80, length >> 7))
    return bytes((first,)) + varint(length)


def _varint_size(value: int) -> int:
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size
