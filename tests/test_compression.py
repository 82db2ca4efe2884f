"""Records are compressed with zstd in 16 KiB blocks, and stores written before still open.

The options are checked in the OPTIONS file RocksDB writes into each partition (what it really
uses), never through sizes: how small a store gets is the bench's business (`make bench`,
storage scenario). A store of release 1 (lz4 table files) is opened, read, written and
compacted with the new options, so its old and new table files are read side by side.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.keys import device_key
from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store
from mqtt_backup.storage.partition import (
    BLOCK_BYTES,
    MEMTABLE_BLOOM_RATIO,
    ZSTD_LEVEL,
    Partition,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STORE_V1 = FIXTURES / "store-v1"
EXPORT_V1 = FIXTURES / "store-v1.export.jsonl"
# A table file's properties block names its compression after the (prefix-shared) key
# "rocksdb.compression": the algorithm the file was really written with.
_TABLE_COMPRESSION = re.compile(rb"ression(ZSTD|LZ4|Snappy|NoCompression)")


def options_files(partition: Path) -> list[Path]:
    """The partition's OPTIONS files, oldest first (RocksDB keeps the last two)."""
    return sorted(partition.glob("OPTIONS-*"), key=lambda f: int(f.name[8:]))


def options_file(partition: Path, latest: Path | None = None) -> dict[str, dict[str, str]]:
    """The partition's latest OPTIONS file (or `latest`): {section: {option: value}}."""
    latest = latest or options_files(partition)[-1]
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in latest.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            current = sections.setdefault(line, {})
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            current[key.strip()] = value.strip()
    return sections


def assert_records_use_zstd(partition: Path) -> None:
    """The records' column family is zstd at every level, at our level, in our block size."""
    sections = options_file(partition)
    family = sections['[CFOptions "default"]']
    assert family["compression"] == "kZSTD"
    assert family["bottommost_compression"] == "kZSTD"
    assert f"level={ZSTD_LEVEL};" in family["compression_opts"]
    assert "max_dict_bytes=0;" in family["compression_opts"]  # no dictionary (it lost)
    table = sections['[TableOptions/BlockBasedTable "default"]']
    assert table["block_size"] == str(BLOCK_BYTES)


def records_tables(partition: Path) -> dict[str, str]:
    """{table file: compression} of the partition's table files holding records."""
    found = {}
    for table in sorted(partition.glob("*.sst")):
        data = table.read_bytes()
        match = _TABLE_COMPRESSION.search(data)
        assert match is not None, f"no compression property in {table.name}"
        if b"default" in data:  # the column family name, also a table property
            found[table.name] = match.group(1).decode()
    return found


def rec(n: int) -> Record:
    return Record("devices/dev-1/t", json.dumps({"n": n, "temp": 21.5, "ok": True}).encode())


def exported(data: Path) -> list[str]:
    result = CliRunner().invoke(app, ["export", "--data", str(data)])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_a_new_partition_writes_records_with_zstd(tmp_path: Path) -> None:
    path = tmp_path / "p0"
    path.mkdir()  # the store makes the directory (and marks it) before RocksDB opens it
    part = Partition.open_writer("p0", path, create=True)
    try:
        key = device_key("dev-1")
        part.write([Pending("dev-1", key, n + 1, rec(n)) for n in range(100)])
    finally:
        part.close()
    assert_records_use_zstd(path)


def test_a_reopened_partition_keeps_the_options(tmp_path: Path) -> None:
    """Reopening loads options from an OPTIONS file (for avoid_flush_during_recovery)."""
    path = tmp_path / "p0"
    path.mkdir()
    Partition.open_writer("p0", path, create=True).close()
    part = Partition.open_writer("p0", path)
    try:
        assert_records_use_zstd(path)
        db_options = options_file(path)["[DBOptions]"]
        assert db_options["avoid_flush_during_recovery"] == "true"
    finally:
        part.close()


def test_a_reopened_partition_differs_from_a_new_one_by_the_recovery_flag_only(
    tmp_path: Path,
) -> None:
    """The reopen options are loaded from an OPTIONS file naming only the flag, then ours applied:
    every other option must be what a new partition gets (compared in RocksDB's own files)."""
    path = tmp_path / "p0"
    path.mkdir()
    Partition.open_writer("p0", path, create=True).close()
    Partition.open_writer("p0", path).close()
    made, reopened = (options_file(path, f) for f in options_files(path)[-2:])
    assert made["[DBOptions]"].pop("avoid_flush_during_recovery") == "false"
    assert reopened["[DBOptions]"].pop("avoid_flush_during_recovery") == "true"
    assert made["[DBOptions]"].pop("create_if_missing") == "true"
    assert reopened["[DBOptions]"].pop("create_if_missing") == "false"
    assert reopened == made


@pytest.fixture
def store_v1(tmp_path: Path) -> Path:
    data = tmp_path / "store-v1"
    shutil.copytree(STORE_V1, data)
    return data


def test_a_release_1_store_is_read_written_and_compacted_into_zstd(store_v1: Path) -> None:
    partitions = sorted((store_v1 / "partitions").iterdir())
    # Release 1 wrote its records' table files with lz4.
    assert {c for p in partitions for c in records_tables(p).values()} == {"LZ4"}
    expected = EXPORT_V1.read_text(encoding="utf-8").splitlines()
    devices = sorted({json.loads(line)["device"] for line in expected})

    store = Store.open(store_v1, create=False)
    try:
        for n, device in enumerate(devices):
            partition, key = store.locate(device)
            item = Pending(device, key, 0, Record(f"devices/{device}/t", f"new-{n}".encode()))
            store.write(partition, [item])
    finally:
        store.close()
    merged = []
    for path in partitions:  # new table files beside the old ones, then compacted with them
        part = Partition.open_writer(path.name, path)
        try:
            assert part.reclaim([device_key(d) for d in devices])
        finally:
            part.close()
        assert_records_use_zstd(path)
        tables = set(records_tables(path).values())
        assert "ZSTD" in tables
        merged.append(tables == {"ZSTD"})
    # Where new keys fall between old ones the compaction rewrites the lz4 file into zstd;
    # elsewhere it moves the file as it is (a trivial move), and both kinds are read together.
    assert any(merged)

    lines = exported(store_v1)
    assert set(expected) <= set(lines)  # every message of release 1, unchanged
    added = [json.loads(x) for x in lines if x not in expected]
    assert sorted(a["payload"] for a in added) == sorted(f"new-{n}" for n in range(len(devices)))
    assert len(lines) == len(expected) + len(devices)


@pytest.mark.parametrize("reopen", [False, True])
def test_the_index_family_filters_lookups_in_tables_and_memtables(
    tmp_path: Path, reopen: bool
) -> None:
    """A new device's index lookup (every one, in a fleet larger than the cache) is answered by
    bloom filters, in the memtable and in table files; the records' family has none (scans)."""
    path = tmp_path / "p0"
    path.mkdir()
    Partition.open_writer("p0", path, create=True).close()
    if reopen:  # options loaded from an OPTIONS file get them too
        Partition.open_writer("p0", path).close()
    sections = options_file(path)
    index = sections['[CFOptions "index"]']
    assert index["memtable_whole_key_filtering"] == "true"
    assert float(index["memtable_prefix_bloom_size_ratio"]) == MEMTABLE_BLOOM_RATIO
    assert sections['[TableOptions/BlockBasedTable "index"]']["filter_policy"] == "bloomfilter"
    assert sections['[TableOptions/BlockBasedTable "default"]']["filter_policy"] == "nullptr"
    assert sections['[CFOptions "default"]']["memtable_whole_key_filtering"] == "false"
