"""The JSON shape of one stored message, and its CSV row.

Shared by `export --format jsonl`, `restore` and the restore protocol (DESIGN.md section 4).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from json.encoder import encode_basestring
from typing import Any

from mqtt_backup.records import (
    Properties,
    Record,
    RecordFields,
    is_dup,
    is_retain,
    qos_of,
    stored_flags,
)
from mqtt_backup.times import NS_PER_S, format_ts

CSV_COLUMNS = ("device", "topic", "ts", "qos", "retain", "dup", "encoding", "payload")


def encode_payload(payload: bytes) -> tuple[str, str]:
    """(encoding, text): `utf8` when the bytes are valid UTF-8, else `base64`."""
    try:
        return "utf8", payload.decode("utf-8")
    except UnicodeDecodeError:
        return "base64", base64.b64encode(payload).decode("ascii")


def message_envelope(device: str, ts_ns: int, record: Record) -> dict[str, Any]:
    """One message as JSON: device, topic, ts, qos, retain, dup, encoding, payload[, properties].

    `dup` (a redelivered copy) and `properties` (MQTT 5, only when present) extend the envelope of
    DESIGN.md; the other keys are exactly as specified there.
    """
    encoding, text = encode_payload(record.payload)
    out: dict[str, Any] = {
        "device": device,
        "topic": record.topic,
        "ts": format_ts(ts_ns),
        "qos": record.qos,
        "retain": record.retain,
        "dup": record.dup,
        "encoding": encoding,
        "payload": text,
    }
    if record.properties is not None:
        out["properties"] = properties_json(record.properties)
    return out


class EnvelopeText:
    """The JSON text of one answer's envelopes, written directly instead of by `json.dumps`.

    Each message's text is, character for character, `json.dumps({**head, "seq": seq,
    **message_envelope(device, ts_ns, record)}, ensure_ascii=False)` (tests/test_envelope.py
    pins it): the restore protocol is a public contract. `json.dumps` with `ensure_ascii=False`
    builds a new encoder per call and walks a new dict per message, about half of a restore's
    CPU per message; here what repeats (the head, the device, the last topic, the second of the
    timestamp) is written once and each message adds its own parts. Strings go through the same
    escaping function `json` uses, so they come out the same.
    """

    def __init__(self, head: Sequence[tuple[str, str]], device: str) -> None:
        """`head`: the keys before `seq` (`id`, `instance`), in order; `device` of every message."""
        fields = "".join(f"{encode_basestring(k)}: {encode_basestring(v)}, " for k, v in head)
        self._open = "{" + fields + '"seq": '
        self._device = f', "device": {encode_basestring(device)}, "topic": '
        self._topic = ("", encode_basestring(""))
        self._second = (-1, "")
        self._middles: dict[int, str] = {}

    def text(self, seq: int, ts_ns: int, record: Record) -> str:
        """The envelope of message number `seq` (from 1), as JSON text."""
        flags = stored_flags(record.qos, record.retain, record.dup)
        return self.fields_text(
            seq, (ts_ns, flags, record.topic, record.properties, record.payload)
        )

    def fields_text(self, seq: int, fields: RecordFields) -> str:
        """`text` from a record's stored fields (`records.decode_fields`): the restore's path."""
        ts_ns, flags, topic, props, payload = fields
        last_topic, topic_json = self._topic
        if topic != last_topic:
            topic_json = encode_basestring(topic)
            self._topic = (topic, topic_json)
        seconds, nanos = divmod(ts_ns, NS_PER_S)
        second, whole = self._second
        if seconds != second:
            whole = format_ts(seconds * NS_PER_S)[:-11]  # without ".000000000Z"
            self._second = (seconds, whole)
        try:
            text, kind = payload.decode("utf-8"), flags & _FLAG_BITS
        except UnicodeDecodeError:
            text, kind = base64.b64encode(payload).decode("ascii"), flags & _FLAG_BITS | _BASE64
        middle = self._middles.get(kind) or self._middle(kind)
        extra = "" if props is None else ', "properties": ' + _dumps(properties_json(props))
        nines = "%09d" % nanos  # noqa: UP031 - half the cost of `{nanos:09d}` in the f-string
        return (
            f'{self._open}{seq}{self._device}{topic_json}, "ts": "{whole}.{nines}Z", '
            f"{middle}{encode_basestring(text)}{extra}}}"
        )

    def _middle(self, kind: int) -> str:
        # From qos to the payload's key: the same for every message of a kind (flags, encoding).
        encoding = "base64" if kind & _BASE64 else "utf8"
        middle = (
            f'"qos": {qos_of(kind)}, "retain": {_BOOL[is_retain(kind)]}, '
            f'"dup": {_BOOL[is_dup(kind)]}, "encoding": "{encoding}", "payload": '
        )
        self._middles[kind] = middle
        return middle


# The stored flags an envelope shows (QoS, retain, DUP), and a bit above them for base64.
_FLAG_BITS = stored_flags(3, retain=True, dup=True)
_BASE64 = 0x100
_BOOL = {False: "false", True: "true"}


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False)


def properties_json(props: Properties) -> dict[str, Any]:
    """MQTT 5 properties as JSON; correlation data is base64 (it is binary)."""
    out: dict[str, Any] = {}
    if props.content_type is not None:
        out["content_type"] = props.content_type
    if props.payload_format is not None:
        out["payload_format"] = props.payload_format
    if props.message_expiry is not None:
        out["message_expiry"] = props.message_expiry
    if props.response_topic is not None:
        out["response_topic"] = props.response_topic
    if props.correlation_data is not None:
        out["correlation_data"] = base64.b64encode(props.correlation_data).decode("ascii")
    if props.user:
        out["user_properties"] = [list(pair) for pair in props.user]
    return out


def csv_row(envelope: dict[str, Any]) -> list[str]:
    """The envelope's CSV columns, in CSV_COLUMNS order."""
    return [
        str(envelope[c]).lower() if isinstance(envelope[c], bool) else str(envelope[c])
        for c in CSV_COLUMNS
    ]
