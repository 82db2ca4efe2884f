"""The JSON shape of one stored message, and its CSV row.

Shared by `export --format jsonl`, `restore` and the restore protocol (DESIGN.md section 4).
"""

from __future__ import annotations

import base64
from typing import Any

from mqtt_backup.records import Properties, Record
from mqtt_backup.times import format_ts

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
