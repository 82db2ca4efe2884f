"""What the scenarios send and store: telemetry topics and payloads, and a store filled directly.

Prefilling through the storage API (no broker, no bridge) is much faster than publishing, so a
scenario that measures something else (restore, rebalance, disk bytes) starts from a full store
in seconds. This module is the bench's only use of the bridge's internals.
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from mqtt_backup.envelope import message_envelope
from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store

PREFILL_BATCH = 5000


def device_name(i: int) -> str:
    """Device ids as a fleet names them."""
    return f"dev-{i:07d}"


def topic_of(device: str) -> str:
    """The telemetry topic of a device (the bridge's default template devices/{device}/#)."""
    return f"devices/{device}/telemetry"


def json_payload(rng: random.Random, seq: int, sent_ns: int = 0) -> bytes:
    """About 100 bytes of JSON telemetry; keys repeat from message to message, as they do."""
    body = {
        "ts": sent_ns or 1_700_000_000_000 + seq,
        "seq": seq,
        "temp": round(rng.uniform(15, 30), 2),
        "hum": round(rng.uniform(20, 80), 1),
        "bat": rng.randint(3000, 4200),
        "ok": True,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def binary_payload(rng: random.Random, seq: int) -> bytes:
    """About 100 bytes of packed binary telemetry: a header, then readings of a few sensors."""
    head = struct.pack(">IQH", seq, 1_700_000_000_000 + seq, 24)
    readings = struct.pack(">24h", *(rng.randint(-2000, 2000) for _ in range(24)))
    return head + readings + rng.randbytes(32)


def fleet_messages(
    count: int, devices: int, kind: str = "json", seed: int = 1
) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) for `count` messages round-robin over `devices` devices."""
    rng = random.Random(seed)
    topics = [topic_of(device_name(i)) for i in range(min(devices, count))]
    for seq in range(count):
        payload = json_payload(rng, seq) if kind == "json" else binary_payload(rng, seq)
        yield topics[seq % len(topics)], payload


def prefill(
    data: Path, messages: Iterator[tuple[str, bytes]], partitions: int = 4, client_id: str = "bench"
) -> int:
    """Write messages into a (new) data directory through the storage API; returns the count."""
    now = ((time.time_ns(), topic, payload) for topic, payload in messages)
    return prefill_at(data, now, partitions, client_id)


def prefill_at(
    data: Path,
    messages: Iterator[tuple[int, str, bytes]],
    partitions: int = 4,
    client_id: str = "bench",
) -> int:
    """Like prefill, with each message's receive time (ns) given; returns the count.

    A partition's clock never goes back (a time earlier than the last one becomes that plus one
    nanosecond), so the messages must come in time order.
    """
    store = Store.open(data, partitions=partitions, client_id=client_id)
    written = 0
    try:
        store.keep_client_id()
        groups: dict[str, list[Pending]] = {}
        for received_ns, topic, payload in messages:
            device = topic.split("/")[1]
            partition, key = store.locate(device)
            groups.setdefault(partition, []).append(
                Pending(device, key, received_ns, Record(topic, payload))
            )
            written += 1
            if written % PREFILL_BATCH == 0:
                _flush(store, groups)
        _flush(store, groups)
    finally:
        store.close()
    return written


def _flush(store: Store, groups: dict[str, list[Pending]]) -> None:
    for partition, items in groups.items():
        if items:
            store.write(partition, items)
    groups.clear()


def disk_bytes(data: Path) -> int:
    """Table files and WALs under the data directory (what `stats` counts as data bytes)."""
    return sum(f.stat().st_size for f in data.rglob("*") if f.suffix in (".sst", ".log"))


def restore_envelope_size(device: str, payload: bytes, seq: int) -> int:
    """Bytes of one restore answer (JSON format) for a stored message, as the design shapes it."""
    body = {
        "seq": seq,
        **message_envelope(device, time.time_ns(), Record(topic_of(device), payload)),
    }
    return len(json.dumps(body, ensure_ascii=False).encode())
