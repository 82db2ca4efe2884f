"""The stored record and its versioned binary encoding (an on-disk contract, golden-pinned).

Layout, version 1 (all integers big-endian):

    version  u8   = 1
    crc32    u32  of every byte after this field
    flags    u8   bits 0-1 QoS, bit 2 retain, bit 3 DUP (redelivered), bit 4 properties follow
    ts_ns    u64  the receive time (the same as in the key)
    topic    u16 length + UTF-8
    props    u32 length + MQTT 5 properties (only when flag bit 4), see below
    payload  the remaining bytes, exactly as received

Properties reuse the MQTT 5 identifiers: 0x01 payload format indicator (u8), 0x02 message
expiry (u32), 0x03 content type, 0x08 response topic (u16 length + UTF-8), 0x09 correlation data
(u16 length + bytes), 0x26 user property (two u16-length UTF-8 strings); in that order.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from mqtt_backup.errors import CorruptRecord

FORMAT_VERSION = 1

_HEAD = struct.Struct(">BI")  # version, crc32
# _HEAD, then flags, ts_ns, topic length: every field before the topic, in one unpack.
_FRONT = struct.Struct(">BIBQH")
_FRONT_UNPACK = _FRONT.unpack_from
_TOPIC_AT = _FRONT.size
_STAMP_PACK = struct.Struct(">BQ").pack  # flags, ts_ns: what precedes `stored_parts`' middle
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HEAD_PACK = _HEAD.pack
_crc32 = zlib.crc32

_FLAG_RETAIN = 0x04
_FLAG_DUP = DUP_FLAG = 0x08  # public: the ingest path counts redelivered copies by it
_FLAG_PROPS = 0x10

_PAYLOAD_FORMAT = 0x01
_MESSAGE_EXPIRY = 0x02
_CONTENT_TYPE = 0x03
_RESPONSE_TOPIC = 0x08
_CORRELATION_DATA = 0x09
_USER_PROPERTY = 0x26


@dataclass(frozen=True, slots=True)
class Properties:
    """The MQTT 5 publish properties worth keeping for a faithful restore."""

    payload_format: int | None = None
    message_expiry: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user: tuple[tuple[str, str], ...] = ()

    def is_empty(self) -> bool:
        """True when no property is set (the record then stores none)."""
        return self == _NO_PROPERTIES


_NO_PROPERTIES = Properties()


@dataclass(frozen=True, slots=True)
class Record:
    """One message as the broker delivered it to the bridge."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    dup: bool = False
    properties: Properties | None = None


def encode_record(record: Record, ts_ns: int) -> bytes:
    """The record's stored bytes; `ts_ns` is the receive time also held in its key."""
    flags, middle = stored_parts(record)
    return encode_parts(flags, ts_ns, middle, record.payload)


def stored_parts(record: Record) -> tuple[int, bytes]:
    """(flags, the bytes between the time and the payload) of the record's stored form.

    Neither depends on the receive time: the ingest path makes them once per message (the
    middle part once per topic when there are no properties: `topic_field`).
    """
    qos = record.qos
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS must be 0, 1 or 2, not {qos}")
    flags = stored_flags(qos, record.retain, record.dup)
    middle = topic_field(record.topic.encode("utf-8"))
    props = record.properties
    if props is None or props.is_empty():
        return flags, middle
    encoded = _encode_properties(props)
    return flags | _FLAG_PROPS, b"".join((middle, _U32.pack(len(encoded)), encoded))


def stored_flags(qos: int, retain: bool, dup: bool) -> int:
    """The flags byte of a record without properties."""
    return qos | (_FLAG_RETAIN if retain else 0) | (_FLAG_DUP if dup else 0)


def is_dup(flags: int) -> bool:
    """Whether stored flags mark a redelivered copy."""
    return bool(flags & _FLAG_DUP)


def topic_field(topic: bytes) -> bytes:
    """The stored topic: u16 length + UTF-8 (the middle part of a record without properties)."""
    return _U16.pack(len(topic)) + topic


def encode_parts(flags: int, ts_ns: int, middle: bytes, payload: bytes) -> bytes:
    """The stored bytes from `stored_parts` and the receive time (the inner loop of `prepare`)."""
    body = _STAMP_PACK(flags, ts_ns) + middle + payload
    return _HEAD_PACK(FORMAT_VERSION, _crc32(body)) + body


# (ts_ns, flags, topic, properties, payload): a stored record's fields, as `decode_fields` reads
# them. A plain tuple, not a `Record`: the restore path reads every message of a history and
# builds its answer straight from these (a frozen dataclass per message cost more than the rest
# of the decoding).
RecordFields = tuple[int, int, str, Properties | None, bytes]


def decode_record(value: bytes) -> tuple[int, Record]:
    """(receive time in ns, record) from stored bytes; CorruptRecord when they do not check out."""
    ts_ns, flags, topic, properties, payload = decode_fields(value)
    record = Record(
        topic=topic,
        payload=payload,
        qos=flags & 0x03,
        retain=bool(flags & _FLAG_RETAIN),
        dup=bool(flags & _FLAG_DUP),
        properties=properties,
    )
    return ts_ns, record


def decode_fields(value: bytes) -> RecordFields:
    """(ts_ns, flags, topic, properties, payload) from stored bytes, checked as `decode_record`.

    The same checks, in the same order, with the same errors: length, version, checksum, then
    the body. `flags`: QoS in bits 0-1 (`qos_of`), retain and DUP bits (`is_retain`, `is_dup`).
    """
    if len(value) < _TOPIC_AT:
        raise CorruptRecord(f"record of {len(value)} bytes is too short")
    version, crc, flags, ts_ns, topic_len = _FRONT_UNPACK(value)
    if version != FORMAT_VERSION:
        raise CorruptRecord(f"unknown record format version {version}")
    # A copy of the body is cheaper than a memoryview of it for the usual ~100-byte record.
    if _crc32(value[_HEAD.size :]) != crc:
        raise CorruptRecord("checksum mismatch")
    pos = _TOPIC_AT + topic_len
    properties = None
    try:
        topic = value[_TOPIC_AT:pos].decode("utf-8")
        if flags & _FLAG_PROPS:
            (props_len,) = _U32.unpack_from(value, pos)
            pos += _U32.size
            properties = _decode_properties(memoryview(value)[pos : pos + props_len])
            pos += props_len
    except (struct.error, UnicodeDecodeError, IndexError) as exc:
        raise CorruptRecord(f"malformed record: {exc}") from exc
    if pos > len(value):
        raise CorruptRecord("record is truncated")
    return ts_ns, flags, topic, properties, value[pos:]


def qos_of(flags: int) -> int:
    """The QoS in stored flags."""
    return flags & 0x03


def is_retain(flags: int) -> bool:
    """Whether stored flags mark a retained message."""
    return bool(flags & _FLAG_RETAIN)


def _pack_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def _encode_properties(props: Properties) -> bytes:
    out = bytearray()
    if props.payload_format is not None:
        out += _U8.pack(_PAYLOAD_FORMAT) + _U8.pack(props.payload_format)
    if props.message_expiry is not None:
        out += _U8.pack(_MESSAGE_EXPIRY) + _U32.pack(props.message_expiry)
    if props.content_type is not None:
        out += _U8.pack(_CONTENT_TYPE) + _pack_str(props.content_type)
    if props.response_topic is not None:
        out += _U8.pack(_RESPONSE_TOPIC) + _pack_str(props.response_topic)
    if props.correlation_data is not None:
        out += _U8.pack(_CORRELATION_DATA) + _U16.pack(len(props.correlation_data))
        out += props.correlation_data
    for key, value in props.user:
        out += _U8.pack(_USER_PROPERTY) + _pack_str(key) + _pack_str(value)
    return bytes(out)


def _decode_properties(raw: memoryview) -> Properties:
    fields: dict[str, object] = {}
    user: list[tuple[str, str]] = []
    pos = 0
    while pos < len(raw):
        ident = raw[pos]
        pos += 1
        match ident:
            case 0x01:
                fields["payload_format"] = raw[pos]
                pos += 1
            case 0x02:
                (fields["message_expiry"],) = _U32.unpack_from(raw, pos)
                pos += _U32.size
            case 0x03 | 0x08 | 0x09:
                (length,) = _U16.unpack_from(raw, pos)
                if pos + 2 + length > len(raw):
                    raise CorruptRecord("property is truncated")
                chunk = bytes(raw[pos + 2 : pos + 2 + length])
                pos += 2 + length
                _store_property(fields, ident, chunk)
            case 0x26:
                key, pos = _read_str(raw, pos)
                value, pos = _read_str(raw, pos)
                user.append((key, value))
            case _:
                raise CorruptRecord(f"unknown property id {ident:#x}")
    return Properties(user=tuple(user), **fields)  # type: ignore[arg-type]


def _store_property(fields: dict[str, object], ident: int, chunk: bytes) -> None:
    if ident == _CORRELATION_DATA:
        fields["correlation_data"] = chunk
    elif ident == _CONTENT_TYPE:
        fields["content_type"] = chunk.decode("utf-8")
    else:
        fields["response_topic"] = chunk.decode("utf-8")


def _read_str(raw: memoryview, pos: int) -> tuple[str, int]:
    (length,) = _U16.unpack_from(raw, pos)
    end = pos + 2 + length
    if end > len(raw):
        raise CorruptRecord("property is truncated")
    return str(raw[pos + 2 : end], "utf-8"), end
