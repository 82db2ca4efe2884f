"""A real store for the web view's tests: devices written through the project's own Store."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store
from mqtt_backup.storage.journal import Gap, GapLog

BASE_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
S = 10**9
# Ids a URL must carry intact: dots, percent signs, spaces, tildes, a lone `..`.
ODD_IDS = ("hall.temp", "50%", "with space", "..", "a~2Eb", "ünï")
SCRIPT = "<script>alert(1)</script>"


def write(store: Store, device: str, items: Sequence[tuple[int, bytes]], topic: str = "") -> None:
    """Store (received ns, payload) pairs for one device in one batch."""
    name, dev_key = store.locate(device)
    where = topic or f"devices/{device}/telemetry"
    store.write(name, [Pending(device, dev_key, ns, Record(where, p)) for ns, p in items])


def telemetry(i: int) -> bytes:
    """The payload of message i of a sensor: numbers at the top, nested and in a list."""
    body = {
        "temp_c": 20 + i % 7,
        "battery": 100 - i / 10,
        "env": {"hum": 40 + i % 3},
        "cells": [3.5, 3.6],
        "ok": True,
        "name": "x",
    }
    return json.dumps(body).encode()


def fleet_store(data: Path) -> None:
    """Sensors every 10 s for 100 min, a silent one, odd ids, binary and a gap.

    Written in time order: each partition's clock is max(received, last + 1), so a message
    written after a later one of its partition would be stored at that later time.
    """
    items: list[tuple[int, str, bytes, str]] = []
    items += [(BASE_NS + i * 10 * S, "sensor-01", telemetry(i), "") for i in range(600)]
    # Every 10 s for 10 minutes, then nothing: silent against a clock at the sensors' end.
    items += [(BASE_NS + i * 10 * S, "quiet-02", telemetry(i), "") for i in range(60)]
    items += [(BASE_NS + n * S, device, b'{"v": 1}', "") for n, device in enumerate(ODD_IDS)]
    items.append((BASE_NS, "xss<b>", SCRIPT.encode(), "devices/xss/<i>"))
    items.append((BASE_NS, "bin-1", bytes([0, 255, 16, 60]), ""))
    items.sort(key=lambda item: item[0])
    store = Store.open(data, 3)
    try:
        batches: dict[str, list[Pending]] = {}
        for ns, device, payload, topic in items:
            name, dev_key = store.locate(device)
            record = Record(topic or f"devices/{device}/telemetry", payload)
            batches.setdefault(name, []).append(Pending(device, dev_key, ns, record))
        for name, batch in batches.items():
            store.write(name, batch)
        GapLog(data).record(Gap(BASE_NS + 30 * 60 * S, BASE_NS + 35 * 60 * S, "session-lost"))
    finally:
        store.close()


def exported(data: Path, *args: str) -> bytes:
    """What `mqtt-backup export --data DATA ARGS` writes to stdout (run in this process)."""
    result = CliRunner().invoke(app, ["export", "--data", str(data), *args])
    assert result.exit_code == 0, result.stderr
    return result.stdout_bytes
