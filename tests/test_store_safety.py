"""The data directory is safe to open: old stores keep working, foreign or damaged ones are refused.

A store written by an earlier release is kept in tests/fixtures (see its README); every version
must open it, read-only and as a writer, and read every message back unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store, StoreReader
from mqtt_backup.storage.journal import BridgeState

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STORE_V1 = FIXTURES / "store-v1"
EXPORT_V1 = FIXTURES / "store-v1.export.jsonl"


@pytest.fixture
def store_v1(tmp_path: Path) -> Path:
    """A private copy of the store written by release 1 (opening writes to RocksDB's files)."""
    data = tmp_path / "store-v1"
    shutil.copytree(STORE_V1, data)
    return data


def exported(data: Path) -> list[str]:
    """`mqtt-backup export` of a data directory, as lines."""
    result = CliRunner().invoke(app, ["export", "--data", str(data)])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def expected_v1() -> list[str]:
    """What release 1 exported from the fixture."""
    return EXPORT_V1.read_text(encoding="utf-8").splitlines()


# ---- a store written by release 1 ---------------------------------------------------------------


def test_release_1_store_reads_every_message(store_v1: Path) -> None:
    assert len(expected_v1()) == 40
    assert exported(store_v1) == expected_v1()
    with StoreReader(store_v1) as reader:
        devices = {d.device: d.count for d in reader.devices()}
        assert sum(devices.values()) == 40
        assert devices["sensor-0"] == 9  # 5 in table files, 4 only in the WAL
        assert devices["wal-only"] == 1
        props = next(reader.messages("props-dev")).record
        assert props.properties is not None
        assert props.properties.user == (("k", "v"), ("k", "w"))
        assert next(reader.messages("bin-dev")).record.payload == bytes(range(256))
        assert [g.reason for g in reader.gaps.all()] == ["session-lost"]
    assert BridgeState.load(store_v1).subscriptions == ["devices/+/#"]


def test_release_1_store_opens_as_a_writer(store_v1: Path) -> None:
    store = Store.open(store_v1, create=False)
    try:
        assert store.client_id == "mqtt-backup-fixture-v1"
        assert [s.name for s in store.manifest.partitions] == ["p0", "p1", "p2"]
        partition, dev_key = store.locate("sensor-0")
        last = max(m["ts"] for m in map(json.loads, expected_v1()))
        new = Pending("sensor-0", dev_key, 0, Record("devices/sensor-0/t", b"new"))
        store.write(partition, [new])
    finally:
        store.close()
    lines = exported(store_v1)
    assert set(expected_v1()) <= set(lines)
    added = [json.loads(x) for x in lines if x not in expected_v1()]
    assert [(a["device"], a["payload"]) for a in added] == [("sensor-0", "new")]
    # The partition's hybrid clock survived: the new message sorts after everything before it.
    assert added[0]["ts"] > last
