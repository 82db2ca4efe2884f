"""Write tests/golden/vectors.json: the on-disk contract (device keys, placement, keys, records).

Run `python -m tools.make_golden` from the repository root. The file pins DESIGN.md section 2:
tests/test_golden.py recomputes every vector from the current code and fails on any difference.
Regenerating it is only right together with a format version bump and a migration of stored data.

The output is deterministic (sorted keys, indent 2, ASCII escapes so that no editor can
re-normalise the Unicode device ids).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mqtt_backup import keys, placement, records

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "vectors.json"

DEVICE_IDS: tuple[str, ...] = (
    "sensor-1",
    "sensor-8",  # lands on the small-weight partition of the weighted set
    "A",
    "",
    "Gerät-ü",
    "Gera\u0308t-u\u0308",  # the same text as above in NFD: ids are bytes, never normalised
    "温度计/3",
    "🌡️-kitchen-🔥",
    "living room lamp",
    " leading and trailing ",
    "zigbee2mqtt_0x00158d0001a2b3c4",
    "long-" + "0123456789abcdef" * 16 + "-ÿ€𝄞",
)

# Partition sets by name: (partition name, weight) in the order placement receives them.
PARTITION_SETS: dict[str, tuple[tuple[str, float], ...]] = {
    "p0..p0": tuple((f"p{i}", 1.0) for i in range(1)),
    "p0..p2": tuple((f"p{i}", 1.0) for i in range(3)),
    "p0..p7": tuple((f"p{i}", 1.0) for i in range(8)),
    "p0..p63": tuple((f"p{i}", 1.0) for i in range(64)),
    "weighted p0:1 p1:2 p2:0.5": (("p0", 1.0), ("p1", 2.0), ("p2", 0.5)),
}
# The set whose raw rendezvous scores are recorded too (they pin the formula, not just the winner).
WEIGHTED = "weighted p0:1 p1:2 p2:0.5"

# (device id, receive time ns, sequence as given to record_key)
RECORD_KEYS: tuple[tuple[str, int, int], ...] = (
    ("sensor-1", 0, 0),
    ("sensor-1", 1_764_000_000_123_456_789, 1),
    ("sensor-1", 1_764_000_000_123_456_789, 2**32 - 1),
    ("sensor-1", 1_764_000_000_123_456_789, 2**32 + 5),  # wraps to 5
    ("Gerät-ü", 2**64 - 1, 7),
    ("", 1, 2**31),
)

_TS = 1_764_000_000_123_456_789

RECORDS: tuple[tuple[str, int, records.Record], ...] = (
    ("empty payload", _TS, records.Record(topic="devices/sensor-1/temp", payload=b"")),
    (
        "all 256 byte values, qos 2",
        _TS + 1,
        records.Record(topic="devices/sensor-1/blob", payload=bytes(range(256)), qos=2),
    ),
    (
        "unicode topic",
        _TS + 2,
        records.Record(topic="devices/Gerät-ü/温度/🌡️", payload="21.5 °C".encode()),
    ),
    (
        "retain, dup, qos 0",
        0,
        records.Record(
            topic="tele/sensor-2/STATE", payload=b'{"on":true}', qos=0, retain=True, dup=True
        ),
    ),
    (
        "all MQTT 5 properties",
        2**64 - 1,
        records.Record(
            topic="devices/sensor-1/cmd",
            payload=b"\x00\x01payload\xff",
            qos=1,
            retain=True,
            properties=records.Properties(
                payload_format=1,
                message_expiry=3600,
                content_type="application/json; charset=utf-8",
                response_topic="devices/sensor-1/reply/ü",
                correlation_data=bytes(range(0, 256, 5)) + b"\x00\xff\x00",
                user=(("k", "v1"), ("k", "v2"), ("ünï", "🙂"), ("", ""), ("k", "v1")),
            ),
        ),
    ),
    (
        "some MQTT 5 properties",
        _TS + 3,
        records.Record(
            topic="zigbee2mqtt/lamp",
            payload=b"",
            qos=1,
            dup=True,
            properties=records.Properties(payload_format=0, correlation_data=b""),
        ),
    ),
)


def properties_to_json(props: records.Properties | None) -> dict[str, Any] | None:
    """Properties as plain JSON (bytes as hex), None when absent."""
    if props is None:
        return None
    return {
        "payload_format": props.payload_format,
        "message_expiry": props.message_expiry,
        "content_type": props.content_type,
        "response_topic": props.response_topic,
        "correlation_data": (
            None if props.correlation_data is None else props.correlation_data.hex()
        ),
        "user": [list(pair) for pair in props.user],
    }


def properties_from_json(data: dict[str, Any] | None) -> records.Properties | None:
    """The inverse of properties_to_json."""
    if data is None:
        return None
    corr = data["correlation_data"]
    return records.Properties(
        payload_format=data["payload_format"],
        message_expiry=data["message_expiry"],
        content_type=data["content_type"],
        response_topic=data["response_topic"],
        correlation_data=None if corr is None else bytes.fromhex(corr),
        user=tuple((str(k), str(v)) for k, v in data["user"]),
    )


def record_from_json(data: dict[str, Any]) -> records.Record:
    """The Record a golden record entry describes."""
    return records.Record(
        topic=data["topic"],
        payload=bytes.fromhex(data["payload"]),
        qos=data["qos"],
        retain=data["retain"],
        dup=data["dup"],
        properties=properties_from_json(data["properties"]),
    )


def partitions_from_json(pairs: list[list[Any]]) -> list[placement.Weighted]:
    """A partition set entry as placement input."""
    return [placement.Weighted(str(name), float(weight)) for name, weight in pairs]


def build() -> dict[str, Any]:
    """All vectors, computed by the current code."""
    sets = {name: [list(p) for p in parts] for name, parts in PARTITION_SETS.items()}
    devices = []
    for device_id in DEVICE_IDS:
        dev_key = keys.device_key(device_id)
        devices.append(
            {
                "id": device_id,
                "device_key": dev_key.hex(),
                "placement": {
                    name: placement.place(dev_key, partitions_from_json(pairs))
                    for name, pairs in sets.items()
                },
                "weighted_scores": {
                    part.name: placement.score(dev_key, part.name, part.weight)
                    for part in partitions_from_json(sets[WEIGHTED])
                },
            }
        )
    record_keys = [
        {
            "device": device_id,
            "ts_ns": ts_ns,
            "seq": seq,
            "key": keys.record_key(keys.device_key(device_id), ts_ns, seq).hex(),
        }
        for device_id, ts_ns, seq in RECORD_KEYS
    ]
    encoded = [
        {
            "name": name,
            "ts_ns": ts_ns,
            "topic": rec.topic,
            "payload": rec.payload.hex(),
            "qos": rec.qos,
            "retain": rec.retain,
            "dup": rec.dup,
            "properties": properties_to_json(rec.properties),
            "encoded": records.encode_record(rec, ts_ns).hex(),
        }
        for name, ts_ns, rec in RECORDS
    ]
    return {
        "_comment": (
            "On-disk contract (DESIGN.md section 2), generated by `python -m tools.make_golden`. "
            "Never regenerate to make a test pass: a change needs a format version bump and a "
            "migration of stored data."
        ),
        "record_format_version": records.FORMAT_VERSION,
        "partition_sets": sets,
        "devices": devices,
        "record_keys": record_keys,
        "records": encoded,
    }


def render(vectors: dict[str, Any]) -> str:
    """The file's exact text."""
    return json.dumps(vectors, sort_keys=True, indent=2, ensure_ascii=True) + "\n"


def main() -> None:
    """Write the vectors file."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render(build()), encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
