"""Golden vectors: the on-disk contract of DESIGN.md section 2, recomputed from the current code.

A failure here means stored data written by an earlier version would no longer be found (device
key, placement, key layout) or no longer be read (record encoding).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from mqtt_backup import keys, placement, records
from tools import make_golden

GOLDEN = Path(__file__).resolve().parent / "golden" / "vectors.json"
VECTORS: dict[str, Any] = json.loads(GOLDEN.read_text(encoding="utf-8"))

CONTRACT = (
    "this is the on-disk contract (DESIGN.md section 2): changing it orphans or misreads stored "
    "data and needs a format version bump and a migration of existing data directories; only then "
    "regenerate tests/golden/vectors.json with `python -m tools.make_golden`"
)


def _ids(entries: list[dict[str, Any]], field: str) -> list[str]:
    return [f"{i}-{entry[field]!r:.40}" for i, entry in enumerate(entries)]


DEVICES: list[dict[str, Any]] = VECTORS["devices"]
RECORD_KEYS: list[dict[str, Any]] = VECTORS["record_keys"]
RECORDS: list[dict[str, Any]] = VECTORS["records"]


def test_file_is_what_the_generator_writes() -> None:
    text = GOLDEN.read_text(encoding="utf-8")
    assert make_golden.render(make_golden.build()) == text, (
        f"tests/golden/vectors.json differs from what tools/make_golden.py computes now; {CONTRACT}"
    )


def test_vectors_cover_the_interesting_device_ids() -> None:
    ids = [d["id"] for d in DEVICES]
    assert len(ids) >= 12
    assert "" in ids
    assert any(not i.isascii() and all(ord(c) < 0x10000 for c in i) for i in ids)  # BMP unicode
    assert any(any(ord(c) >= 0x10000 for c in i) for i in ids)  # emoji / astral plane
    assert any(" " in i for i in ids)
    assert any(len(i.encode()) > 255 for i in ids)
    assert set(VECTORS["partition_sets"]) >= {"p0..p0", "p0..p2", "p0..p7", "p0..p63"}
    sizes = {name: len(parts) for name, parts in VECTORS["partition_sets"].items()}
    assert sorted(sizes.values()) == [1, 3, 3, 8, 64]


def test_record_format_version() -> None:
    assert VECTORS["record_format_version"] == records.FORMAT_VERSION, (
        f"records.FORMAT_VERSION changed; {CONTRACT}"
    )
    for entry in RECORDS:
        assert bytes.fromhex(entry["encoded"])[0] == records.FORMAT_VERSION


@pytest.mark.parametrize("entry", DEVICES, ids=_ids(DEVICES, "id"))
def test_device_key(entry: dict[str, Any]) -> None:
    got = keys.device_key(entry["id"]).hex()
    assert got == entry["device_key"], (
        f"device_key({entry['id']!r}) is {got}, golden {entry['device_key']}; {CONTRACT}"
    )
    assert len(bytes.fromhex(got)) == keys.DEVICE_KEY_LEN


@pytest.mark.parametrize("entry", DEVICES, ids=_ids(DEVICES, "id"))
def test_placement(entry: dict[str, Any]) -> None:
    dev_key = bytes.fromhex(entry["device_key"])
    for set_name, pairs in VECTORS["partition_sets"].items():
        partitions = make_golden.partitions_from_json(pairs)
        got = placement.place(dev_key, partitions)
        want = entry["placement"][set_name]
        assert got == want, (
            f"device {entry['id']!r} on partition set {set_name!r} is placed on {got}, "
            f"golden {want}; {CONTRACT}"
        )
        fast = placement.Placement(partitions)(dev_key)  # what the store places with
        assert fast == want, f"Placement puts device {entry['id']!r} on {fast}, golden {want}"


@pytest.mark.parametrize("entry", DEVICES, ids=_ids(DEVICES, "id"))
def test_weighted_scores(entry: dict[str, Any]) -> None:
    dev_key = bytes.fromhex(entry["device_key"])
    for part in make_golden.partitions_from_json(VECTORS["partition_sets"][make_golden.WEIGHTED]):
        got = placement.score(dev_key, part.name, part.weight)
        want = entry["weighted_scores"][part.name]
        # Relative tolerance only for libm differences in the last bits of ln().
        assert math.isclose(got, want, rel_tol=1e-12), (
            f"score of {part} for device {entry['id']!r} is {got!r}, golden {want!r}; {CONTRACT}"
        )


@pytest.mark.parametrize("entry", RECORD_KEYS, ids=_ids(RECORD_KEYS, "seq"))
def test_record_key(entry: dict[str, Any]) -> None:
    dev_key = keys.device_key(entry["device"])
    got = keys.record_key(dev_key, entry["ts_ns"], entry["seq"])
    assert got.hex() == entry["key"], (
        f"record_key({entry['device']!r}, {entry['ts_ns']}, {entry['seq']}) is {got.hex()}, "
        f"golden {entry['key']}; {CONTRACT}"
    )
    assert len(got) == keys.KEY_LEN
    assert keys.split_key(bytes.fromhex(entry["key"])) == (
        dev_key,
        entry["ts_ns"],
        entry["seq"] & keys.SEQ_MASK,
    )


def test_record_key_sequence_wraps() -> None:
    wrapped = [e for e in RECORD_KEYS if e["seq"] > keys.SEQ_MASK]
    assert wrapped, "the vectors must include a sequence beyond 32 bits"
    for entry in wrapped:
        dev_key = keys.device_key(entry["device"])
        assert keys.record_key(dev_key, entry["ts_ns"], entry["seq"]) == keys.record_key(
            dev_key, entry["ts_ns"], entry["seq"] - 2**32
        )


@pytest.mark.parametrize("entry", RECORDS, ids=_ids(RECORDS, "name"))
def test_record_encoding(entry: dict[str, Any]) -> None:
    record = make_golden.record_from_json(entry)
    got = records.encode_record(record, entry["ts_ns"]).hex()
    assert got == entry["encoded"], (
        f"encode_record of golden record {entry['name']!r} changed:\n got    {got}\n golden "
        f"{entry['encoded']}\n{CONTRACT}"
    )


@pytest.mark.parametrize("entry", RECORDS, ids=_ids(RECORDS, "name"))
def test_record_decoding(entry: dict[str, Any]) -> None:
    ts_ns, record = records.decode_record(bytes.fromhex(entry["encoded"]))
    assert ts_ns == entry["ts_ns"], f"golden record {entry['name']!r} decodes wrongly; {CONTRACT}"
    assert record == make_golden.record_from_json(entry), (
        f"golden record {entry['name']!r} decodes to {record!r}; {CONTRACT}"
    )


def test_golden_records_cover_the_cases() -> None:
    decoded = [records.decode_record(bytes.fromhex(e["encoded"]))[1] for e in RECORDS]
    assert any(r.payload == b"" for r in decoded)
    assert any(r.payload == bytes(range(256)) for r in decoded)
    assert any(not r.topic.isascii() for r in decoded)
    assert any(r.retain and r.dup and r.qos == 0 for r in decoded)
    full = [r.properties for r in decoded if r.properties is not None]
    assert any(
        p.payload_format is not None
        and p.message_expiry is not None
        and p.content_type is not None
        and p.response_topic is not None
        and p.correlation_data is not None
        and len({k for k, _ in p.user}) < len(p.user)
        for p in full
    )
