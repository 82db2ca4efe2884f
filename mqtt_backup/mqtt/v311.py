"""MQTT 3.1.1 for the codec connection: the few packets a client needs, as `mqtt5` packet objects.

`mqtt5` speaks only MQTT 5.0. A 3.1.1 client needs ten packet kinds without properties, so this
small codec reads and writes them with the same packet classes, and the connection above it does
not know which version runs: flow control, keepalive and errors stay one implementation.
"""

from __future__ import annotations

import struct

import mqtt5

# 3.1.1 CONNACK return codes (section 3.2.2.3) as their MQTT 5 counterparts.
_CONNACK_CODES = {
    0: mqtt5.ConnAckReasonCode.SUCCESS,
    1: mqtt5.ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    2: mqtt5.ConnAckReasonCode.CLIENT_ID_NOT_VALID,
    3: mqtt5.ConnAckReasonCode.SERVER_UNAVAILABLE,
    4: mqtt5.ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD,
    5: mqtt5.ConnAckReasonCode.NOT_AUTHORIZED,
}
_SUBACK_CODES = {
    0: mqtt5.SubAckReasonCode.GRANTED_QOS_AT_MOST_ONCE,
    1: mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,
    2: mqtt5.SubAckReasonCode.GRANTED_QOS_EXACTLY_ONCE,
    0x80: mqtt5.SubAckReasonCode.UNSPECIFIED_ERROR,
}


def read(buffer: memoryview) -> tuple[mqtt5.Packet, int]:
    """One packet from the start of `buffer` and its length, like `mqtt5.read`.

    IndexError when the buffer holds only part of a packet, ValueError when it is malformed.
    """
    remaining, header = _remaining_length(buffer)
    end = header + remaining
    if len(buffer) < end:
        raise IndexError("Not enough bytes")
    return _decode(buffer[0], bytes(buffer[header:end])), end


def _remaining_length(buffer: memoryview) -> tuple[int, int]:
    value, shift = 0, 0
    for i in range(1, 5):
        if len(buffer) <= i:
            raise IndexError("Not enough bytes")
        value |= (buffer[i] & 0x7F) << shift
        if not buffer[i] & 0x80:
            return value, i + 1
        shift += 7
    raise ValueError("Invalid remaining length")


def _decode(first: int, body: bytes) -> mqtt5.Packet:
    match first >> 4:
        case 2 if len(body) == 2 and body[1] in _CONNACK_CODES:
            return mqtt5.ConnAckPacket(
                session_present=bool(body[0] & 1), reason_code=_CONNACK_CODES[body[1]]
            )
        case 3:
            return _publish(first, body)
        case 4 if len(body) == 2:
            return mqtt5.PubAckPacket(struct.unpack(">H", body)[0])
        case 9 if len(body) >= 3 and all(c in _SUBACK_CODES for c in body[2:]):
            codes = [_SUBACK_CODES[c] for c in body[2:]]
            return mqtt5.SubAckPacket(struct.unpack(">H", body[:2])[0], codes)
        case 13 if not body:
            return mqtt5.PingRespPacket()
    raise ValueError(f"unexpected or malformed MQTT 3.1.1 packet (type {first >> 4})")


def _publish(first: int, body: bytes) -> mqtt5.PublishPacket:
    qos = (first >> 1) & 3
    if qos == 3 or len(body) < 2:
        raise ValueError("malformed MQTT 3.1.1 PUBLISH")
    size = struct.unpack(">H", body[:2])[0]
    at = 2 + size
    packet_id = None
    if qos:
        packet_id = struct.unpack(">H", body[at : at + 2])[0]
        at += 2
    return mqtt5.PublishPacket(
        body[2 : 2 + size].decode("utf-8"),
        body[at:],
        qos=mqtt5.QoS(qos),
        retain=bool(first & 1),
        packet_id=packet_id,
        duplicate=bool(first & 8),
    )


def write(packet: mqtt5.Packet) -> bytes:
    """The 3.1.1 bytes of a packet a client sends; ValueError for what 3.1.1 cannot say."""
    match packet:
        case mqtt5.ConnectPacket():
            return _packet(0x10, _connect(packet))
        case mqtt5.PublishPacket():
            return _packet(0x30 | _publish_flags(packet), _publish_body(packet))
        case mqtt5.PubAckPacket():
            return _packet(0x40, struct.pack(">H", packet.packet_id))
        case mqtt5.SubscribePacket():
            filters = b"".join(
                _text(f.pattern) + bytes([int(f.max_qos)]) for f in packet.topic_filters
            )
            return _packet(0x82, struct.pack(">H", packet.packet_id) + filters)
        case mqtt5.PingReqPacket():
            return b"\xc0\x00"
        case mqtt5.DisconnectPacket():
            return b"\xe0\x00"
    raise ValueError(f"the MQTT 3.1.1 codec does not send {type(packet).__name__}")


def _connect(packet: mqtt5.ConnectPacket) -> bytes:
    if packet.will is not None:
        raise ValueError("the MQTT 3.1.1 codec sends no last will")
    flags = 0x02 if packet.clean_start else 0
    payload = _text(packet.client_id)
    if packet.username is not None:
        flags |= 0x80
        payload += _text(packet.username)
    if packet.password is not None:
        flags |= 0x40
        payload += struct.pack(">H", len(packet.password)) + packet.password
    return _text("MQTT") + bytes([4, flags]) + struct.pack(">H", packet.keep_alive) + payload


def _publish_flags(packet: mqtt5.PublishPacket) -> int:
    return (8 if packet.duplicate else 0) | (int(packet.qos) << 1) | (1 if packet.retain else 0)


def _publish_body(packet: mqtt5.PublishPacket) -> bytes:
    packet_id = b"" if packet.packet_id is None else struct.pack(">H", packet.packet_id)
    return _text(packet.topic) + packet_id + packet.payload


def _text(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack(">H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    length, size = bytearray(), len(body)
    while True:
        size, digit = divmod(size, 128)
        length.append(digit | (0x80 if size else 0))
        if not size:
            return bytes([first]) + bytes(length) + body
