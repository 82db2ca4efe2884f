"""The stored record: lossless round trip, and every kind of damage detected as CorruptRecord."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqtt_backup.errors import EXIT_STORAGE, CorruptRecord
from mqtt_backup.records import FORMAT_VERSION, Properties, Record, decode_record, encode_record
from tests.conftest import examples

MAX_TOPIC_BYTES = 65535
MAX_PAYLOAD = 300 * 1024

# MQTT strings are UTF-8 without NUL; Python strings with lone surrogates cannot be UTF-8.
_chars = st.characters(codec="utf-8", exclude_characters="\x00")
short_text = st.text(_chars, max_size=40)


def _fill_to_limit(piece: str) -> str:
    """The piece repeated to as many whole copies as fit in an MQTT topic (65535 bytes)."""
    return piece * (MAX_TOPIC_BYTES // len(piece.encode("utf-8")))


topics = st.one_of(
    st.text(_chars, max_size=200),
    st.text(_chars, min_size=1, max_size=8).map(_fill_to_limit),  # long, up to the limit
)


def _stretch(seed: bytes, size: int) -> bytes:
    return (seed * (size // len(seed) + 1))[:size]


_seeds = st.binary(min_size=1, max_size=64)
payloads = st.one_of(
    st.binary(max_size=2048),
    st.builds(_stretch, _seeds, st.integers(0, 16 * 1024)),
    st.builds(_stretch, _seeds, st.integers(100 * 1024, MAX_PAYLOAD)),  # occasionally large
)

properties = st.builds(
    Properties,
    payload_format=st.none() | st.integers(0, 255),
    message_expiry=st.none() | st.integers(0, 2**32 - 1),
    content_type=st.none() | short_text,
    response_topic=st.none() | short_text,
    correlation_data=st.none() | st.binary(max_size=300),
    user=st.lists(st.tuples(short_text, short_text), max_size=6).map(tuple),
)

records = st.builds(
    Record,
    topic=topics,
    payload=payloads,
    qos=st.integers(0, 2),
    retain=st.booleans(),
    dup=st.booleans(),
    properties=st.none() | properties,
)
small_records = st.builds(
    Record,
    topic=st.text(_chars, max_size=30),
    payload=st.binary(max_size=64),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    dup=st.booleans(),
    properties=st.none() | properties,
)
timestamps = st.integers(0, 2**64 - 1)


def _expected(record: Record) -> Record:
    """What decoding gives back: an all-empty Properties is not stored, so it comes back None."""
    if record.properties is not None and record.properties.is_empty():
        return Record(
            topic=record.topic,
            payload=record.payload,
            qos=record.qos,
            retain=record.retain,
            dup=record.dup,
            properties=None,
        )
    return record


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records, ts_ns=timestamps)
def test_round_trip(record: Record, ts_ns: int) -> None:
    encoded = encode_record(record, ts_ns)
    assert decode_record(encoded) == (ts_ns, _expected(record))


def test_round_trip_edges() -> None:
    cases = [
        Record(topic="", payload=b""),
        Record(topic="a" * MAX_TOPIC_BYTES, payload=b"x"),
        Record(topic="é" * (MAX_TOPIC_BYTES // 2), payload=bytes(range(256)) * 1200),
        Record(topic="t", payload=b"\x00" * MAX_PAYLOAD, qos=0, retain=True, dup=True),
        Record(topic="t/🙂", payload=b"", qos=2, properties=Properties(payload_format=0)),
        Record(topic="t", payload=b"p", properties=Properties(correlation_data=b"")),
        Record(topic="t", payload=b"p", properties=Properties(content_type="")),
        Record(topic="t", payload=b"p", properties=Properties(user=(("", ""),))),
        Record(
            topic="t",
            payload=b"p",
            properties=Properties(
                message_expiry=2**32 - 1,
                correlation_data=b"\xff" * 65535,
                user=(("k", "v"), ("k", "v"), ("k", "w")),
            ),
        ),
    ]
    for ts_ns in (0, 1, 2**63, 2**64 - 1):
        for record in cases:
            assert decode_record(encode_record(record, ts_ns)) == (ts_ns, record)


def test_empty_properties_are_not_stored() -> None:
    plain = encode_record(Record(topic="t", payload=b"p"), 5)
    assert encode_record(Record(topic="t", payload=b"p", properties=Properties()), 5) == plain
    assert decode_record(plain)[1].properties is None


def test_encoding_is_deterministic_and_version_first() -> None:
    record = Record(topic="devices/x/t", payload=b"21.5", properties=Properties(user=(("a", "b"),)))
    first = encode_record(record, 42)
    assert first == encode_record(record, 42)
    assert first[0] == FORMAT_VERSION
    (crc,) = struct.unpack_from(">I", first, 1)
    assert crc == zlib.crc32(first[5:])


@settings(max_examples=examples(300), deadline=None)
@given(record=small_records, ts_ns=timestamps, data=st.data())
def test_any_flipped_bit_is_detected(record: Record, ts_ns: int, data: st.DataObject) -> None:
    encoded = bytearray(encode_record(record, ts_ns))
    position = data.draw(st.integers(0, len(encoded) - 1), label="position")
    bit = data.draw(st.integers(0, 7), label="bit")
    encoded[position] ^= 1 << bit
    with pytest.raises(CorruptRecord):
        decode_record(bytes(encoded))


@settings(max_examples=examples(300), deadline=None)
@given(record=small_records, ts_ns=timestamps, data=st.data())
def test_any_changed_byte_is_detected(record: Record, ts_ns: int, data: st.DataObject) -> None:
    encoded = bytearray(encode_record(record, ts_ns))
    position = data.draw(st.integers(0, len(encoded) - 1), label="position")
    encoded[position] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(CorruptRecord):
        decode_record(bytes(encoded))


def test_every_single_bit_flip_of_a_full_record_is_detected() -> None:
    record = Record(
        topic="devices/Gerät/t",
        payload=bytes(range(256)),
        qos=2,
        retain=True,
        properties=Properties(
            payload_format=1,
            message_expiry=60,
            content_type="c",
            response_topic="r",
            correlation_data=b"\x01\x02",
            user=(("k", "v"),),
        ),
    )
    encoded = encode_record(record, 123)
    for position in range(len(encoded)):
        for bit in range(8):
            damaged = bytearray(encoded)
            damaged[position] ^= 1 << bit
            with pytest.raises(CorruptRecord):
                decode_record(bytes(damaged))


@settings(max_examples=examples(200), deadline=None)
@given(record=small_records, ts_ns=timestamps, data=st.data())
def test_truncation_is_detected(record: Record, ts_ns: int, data: st.DataObject) -> None:
    encoded = encode_record(record, ts_ns)
    cut = data.draw(st.integers(0, len(encoded) - 1), label="cut")
    with pytest.raises(CorruptRecord):
        decode_record(encoded[:cut])


def test_every_truncation_of_a_record_is_detected() -> None:
    encoded = encode_record(Record(topic="a/b", payload=b"payload", dup=True), 7)
    for cut in range(len(encoded)):
        with pytest.raises(CorruptRecord):
            decode_record(encoded[:cut])


@settings(max_examples=examples(100), deadline=None)
@given(record=small_records, extra=st.binary(min_size=1, max_size=16))
def test_appended_bytes_are_detected(record: Record, extra: bytes) -> None:
    with pytest.raises(CorruptRecord):
        decode_record(encode_record(record, 1) + extra)


def test_too_short_names_the_length() -> None:
    with pytest.raises(CorruptRecord, match="too short") as info:
        decode_record(b"")
    assert info.value.exit_code == EXIT_STORAGE
    assert "corrupt record" in str(info.value)


@pytest.mark.parametrize("version", [0, 2, 3, 127, 255])
def test_unknown_version_is_corrupt(version: int) -> None:
    encoded = encode_record(Record(topic="t", payload=b"p"), 1)
    # A well-formed record of another version: right CRC, only the version byte differs.
    other = bytes([version]) + encoded[1:]
    with pytest.raises(CorruptRecord, match=f"unknown record format version {version}"):
        decode_record(other)


def _with_crc(body: bytes, version: int = FORMAT_VERSION) -> bytes:
    return struct.pack(">BI", version, zlib.crc32(body)) + body


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("topic is not UTF-8", struct.pack(">BQH", 1, 0, 2) + b"\xff\xfe"),
        ("topic longer than the record", struct.pack(">BQH", 1, 0, 50) + b"abc"),
        ("properties longer than the record", struct.pack(">BQHI", 0x11, 0, 0, 99) + b"\x01"),
        ("properties length cut", struct.pack(">BQH", 0x11, 0, 0) + b"\x00\x00"),
        ("unknown property id", struct.pack(">BQHI", 0x11, 0, 0, 2) + b"\x7f\x00"),
        ("payload format cut", struct.pack(">BQHI", 0x11, 0, 0, 1) + b"\x01"),
        ("message expiry cut", struct.pack(">BQHI", 0x11, 0, 0, 3) + b"\x02\x00\x00"),
        ("user property cut", struct.pack(">BQHI", 0x11, 0, 0, 4) + b"\x26\x00\x05ab"),
        ("user property value missing", struct.pack(">BQHI", 0x11, 0, 0, 4) + b"\x26\x00\x01a"),
        (
            "user property not UTF-8",
            struct.pack(">BQHI", 0x11, 0, 0, 7) + b"\x26\x00\x01\xff\x00\x01a",
        ),
        ("content type not UTF-8", struct.pack(">BQHI", 0x11, 0, 0, 4) + b"\x03\x00\x01\xff"),
    ],
)
def test_malformed_body_with_valid_crc_is_corrupt(name: str, body: bytes) -> None:
    with pytest.raises(CorruptRecord):
        decode_record(_with_crc(body))
    assert name


@settings(max_examples=examples(500), deadline=None)
@given(body=st.binary(min_size=11, max_size=80))
def test_arbitrary_body_with_valid_crc_decodes_or_is_corrupt(body: bytes) -> None:
    """A valid checksum over garbage must not raise anything but CorruptRecord."""
    try:
        ts_ns, record = decode_record(_with_crc(body))
    except CorruptRecord:
        return
    assert 0 <= ts_ns < 2**64
    assert 0 <= record.qos <= 3
    assert len(record.topic.encode("utf-8")) <= len(body)
