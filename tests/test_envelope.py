"""The JSON envelope of a stored message and its CSV row."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_backup.envelope import (
    CSV_COLUMNS,
    EnvelopeText,
    csv_row,
    encode_payload,
    message_envelope,
    properties_json,
)
from mqtt_backup.records import Properties, Record, decode_fields, decode_record, encode_record
from tests.conftest import examples

TS = 1_795_514_400_123_456_789
TS_TEXT = "2026-11-24T10:00:00.123456789Z"


@pytest.mark.parametrize(
    ("payload", "encoding", "text"),
    [
        (b"", "utf8", ""),
        (b"21.5", "utf8", "21.5"),
        (b'{"t": 21.5}', "utf8", '{"t": 21.5}'),
        ("Gerät 🌡️ 温度".encode(), "utf8", "Gerät 🌡️ 温度"),
        (b"a\x00b", "utf8", "a\x00b"),  # NUL is valid UTF-8
        (b"\xff", "base64", "/w=="),
        (b"\xc3", "base64", "ww=="),  # cut multi-byte sequence
        (b"\xed\xa0\x80", "base64", "7aCA"),  # an encoded surrogate is not UTF-8
        (b"\xef\xbb\xbfhi", "utf8", "\ufeffhi"),  # a BOM is kept, not stripped
        (bytes(range(256)), "base64", base64.b64encode(bytes(range(256))).decode()),
    ],
)
def test_encode_payload(payload: bytes, encoding: str, text: str) -> None:
    assert encode_payload(payload) == (encoding, text)


@settings(max_examples=examples(300), deadline=None)
@given(
    payload=st.binary(max_size=200)
    | st.text(max_size=50).map(lambda t: t.encode("utf-8", "surrogatepass"))
)
def test_encode_payload_is_lossless(payload: bytes) -> None:
    encoding, text = encode_payload(payload)
    if encoding == "utf8":
        assert text.encode("utf-8") == payload
    else:
        assert encoding == "base64"
        assert base64.b64decode(text, validate=True) == payload
        with pytest.raises(UnicodeDecodeError):
            payload.decode("utf-8")


def test_envelope_without_properties() -> None:
    record = Record(topic="devices/d1/temp", payload=b"21.5", qos=1)
    env = message_envelope("d1", TS, record)
    assert env == {
        "device": "d1",
        "topic": "devices/d1/temp",
        "ts": TS_TEXT,
        "qos": 1,
        "retain": False,
        "dup": False,
        "encoding": "utf8",
        "payload": "21.5",
    }
    assert list(env) == [*CSV_COLUMNS]
    assert json.loads(json.dumps(env)) == env


def test_envelope_binary_payload_retain_dup() -> None:
    record = Record(topic="t/🙂", payload=b"\x00\xff", qos=0, retain=True, dup=True)
    env = message_envelope("Gerät", 0, record)
    assert env["ts"] == "1970-01-01T00:00:00.000000000Z"
    assert (env["qos"], env["retain"], env["dup"]) == (0, True, True)
    assert (env["encoding"], env["payload"]) == ("base64", "AP8=")
    assert env["device"] == "Gerät"
    assert env["topic"] == "t/🙂"
    assert "properties" not in env


def test_envelope_with_properties() -> None:
    props = Properties(
        payload_format=1,
        message_expiry=60,
        content_type="application/json",
        response_topic="r/1",
        correlation_data=b"\x00\x01\xfe",
        user=(("k", "v1"), ("k", "v2"), ("ü", "🙂")),
    )
    env = message_envelope("d", TS, Record(topic="t", payload=b"{}", properties=props))
    assert env["properties"] == {
        "payload_format": 1,
        "message_expiry": 60,
        "content_type": "application/json",
        "response_topic": "r/1",
        "correlation_data": "AAH+",
        "user_properties": [["k", "v1"], ["k", "v2"], ["ü", "🙂"]],
    }
    assert json.loads(json.dumps(env, ensure_ascii=False)) == env


# Quotes, backslashes, control characters, a lone surrogate, a line separator: what JSON escapes.
_TEXTS = st.text(max_size=12) | st.sampled_from(
    ["", "t/🙂", 'q"\\\n\x00\x1f\x7f', "\ud800x", "\u2028"]
)
_PROPS = st.none() | st.builds(
    Properties,
    payload_format=st.none() | st.integers(0, 1),
    message_expiry=st.none() | st.integers(0, 2**32 - 1),
    content_type=st.none() | _TEXTS,
    response_topic=st.none() | _TEXTS,
    correlation_data=st.none() | st.binary(max_size=8),
    user=st.lists(st.tuples(_TEXTS, _TEXTS), max_size=3).map(tuple),
)
_RECORDS = st.builds(
    Record,
    topic=_TEXTS,
    payload=st.binary(max_size=40) | _TEXTS.map(lambda t: t.encode("utf-8", "surrogatepass")),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    dup=st.booleans(),
    properties=_PROPS,
)


@settings(max_examples=300, deadline=None)
@given(
    head=st.lists(st.sampled_from(["id", "instance"]), unique=True).flatmap(
        lambda keys: st.tuples(*[st.tuples(st.just(k), _TEXTS) for k in keys])
    ),
    device=_TEXTS,
    messages=st.lists(
        st.tuples(st.integers(0, 2**64 - 1), _RECORDS) | st.tuples(st.just(TS), _RECORDS),
        min_size=1,
        max_size=4,
    ),
)
def test_envelope_text_is_what_json_dumps_writes(
    head: tuple[tuple[str, str], ...], device: str, messages: list[tuple[int, Record]]
) -> None:
    # The restore protocol's bytes: the direct writer must never differ from json.dumps.
    texts = EnvelopeText(head, device)
    for seq, (ts_ns, record) in enumerate(messages, 1):
        body = {**dict(head), "seq": seq, **message_envelope(device, ts_ns, record)}
        assert texts.text(seq, ts_ns, record) == json.dumps(body, ensure_ascii=False)


@settings(max_examples=300, deadline=None)
@given(
    device=_TEXTS,
    messages=st.lists(st.tuples(st.integers(0, 2**64 - 1), _RECORDS), min_size=1, max_size=4),
)
def test_envelope_from_stored_fields_is_what_json_dumps_writes(
    device: str, messages: list[tuple[int, Record]]
) -> None:
    # The restore's path: each envelope straight from a stored record's fields, no Record.
    texts = EnvelopeText([("id", "r")], device)
    for seq, (ts_ns, record) in enumerate(messages, 1):
        try:
            stored = encode_record(record, ts_ns)
        except UnicodeEncodeError:
            continue  # a lone surrogate: no such message is ever stored
        body = {"id": "r", "seq": seq, **message_envelope(device, *decode_record(stored))}
        assert texts.fields_text(seq, decode_fields(stored)) == json.dumps(body, ensure_ascii=False)


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        (Properties(), {}),
        (Properties(payload_format=0), {"payload_format": 0}),
        (Properties(message_expiry=0), {"message_expiry": 0}),
        (Properties(content_type=""), {"content_type": ""}),
        (Properties(correlation_data=b""), {"correlation_data": ""}),
        (Properties(user=(("", ""),)), {"user_properties": [["", ""]]}),
    ],
)
def test_properties_json_keeps_falsy_values(props: Properties, expected: dict[str, object]) -> None:
    assert properties_json(props) == expected


def test_csv_row() -> None:
    env = message_envelope(
        "d,1", TS, Record(topic='a/"b"', payload=b"x\ny", qos=2, retain=True, dup=False)
    )
    row = csv_row(env)
    assert row == ["d,1", 'a/"b"', TS_TEXT, "2", "true", "false", "utf8", "x\ny"]
    assert len(row) == len(CSV_COLUMNS)
    # Through the csv module the row survives commas, quotes and newlines.
    out = io.StringIO()
    csv.writer(out).writerow(row)
    assert next(csv.reader(io.StringIO(out.getvalue()))) == row


def test_csv_row_base64_and_no_properties_column() -> None:
    props = Properties(content_type="c")
    env = message_envelope("d", 0, Record(topic="t", payload=b"\xff", properties=props))
    row = csv_row(env)
    assert row[CSV_COLUMNS.index("encoding")] == "base64"
    assert row[CSV_COLUMNS.index("payload")] == "/w=="
    assert row[CSV_COLUMNS.index("retain")] == "false"
    assert CSV_COLUMNS == ("device", "topic", "ts", "qos", "retain", "dup", "encoding", "payload")
