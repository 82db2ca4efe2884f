"""`Pending`: a message in the stored form's parts, made from a record or by the ingest path."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_backup.keys import record_key
from mqtt_backup.records import (
    Properties,
    Record,
    encode_parts,
    encode_record,
    stored_flags,
    topic_field,
)
from mqtt_backup.storage import Pending, Store
from tests.test_records import _expected, small_records, timestamps

DEV_KEY = bytes(range(16))


@settings(max_examples=100, deadline=None)
@given(record=small_records, ts_ns=timestamps)
def test_a_pending_keeps_its_record(record: Record, ts_ns: int) -> None:
    item = Pending("dev-1", DEV_KEY, ts_ns, record)
    assert (item.device_id, item.device_key, item.received_ns) == ("dev-1", DEV_KEY, ts_ns)
    assert (item.payload, item.dup) == (record.payload, record.dup)
    assert item.record == _expected(record)
    assert encode_parts(item[3], ts_ns, item[4], item[5]) == encode_record(record, ts_ns)


@settings(max_examples=100, deadline=None)
@given(
    topic=st.text(min_size=1, max_size=40),
    payload=st.binary(max_size=64),
    retain=st.booleans(),
    dup=st.booleans(),
    ts_ns=timestamps,
)
def test_the_wire_parts_encode_as_the_record_does(
    topic: str, payload: bytes, retain: bool, dup: bool, ts_ns: int
) -> None:
    """The ingest fast path's parts (flags from the wire, topic bytes as received)."""
    record = Record(topic, payload, 1, retain, dup)
    flags, middle = stored_flags(1, retain, dup), topic_field(topic.encode("utf-8"))
    assert encode_parts(flags, ts_ns, middle, payload) == encode_record(record, ts_ns)


def test_prepare_stores_the_bytes_of_encode_record(tmp_path: Path) -> None:
    """The write path inlines the record encoding: byte for byte what `encode_record` gives.

    Two devices interleaved, a redelivered copy, properties, a receive time that goes back (the
    clock then counts on by 1 ns), and a second batch (index entries carried over).
    """
    store = Store.open(tmp_path / "data", 1)
    try:
        (partition,) = store.partitions
        props = Properties(message_expiry=60, user=(("k", "v"),))
        sent = [
            ("dev-a", 1000, Record("devices/dev-a/t", b"one")),
            ("dev-b", 1000, Record("devices/dev-b/t", b"two", 0, True, False, props)),
            ("dev-a", 900, Record("devices/dev-a/t", b"three", 1, False, True)),
        ]
        store.write(partition, [Pending(d, store.locate(d)[1], ns, r) for d, ns, r in sent])
        again = Record("devices/dev-a/t", b"four")
        store.write(partition, [Pending("dev-a", store.locate("dev-a")[1], 5000, again)])
        clocks = [1000, 1001, 1002, 5000]
        want = {
            record_key(store.locate(d)[1], ts, seq): encode_record(r, ts)
            for seq, ((d, _, r), ts) in enumerate(
                zip([*sent, ("dev-a", 0, again)], clocks, strict=True), start=1
            )
        }
        part = store.partitions[partition]
        assert dict(part.records()) == want
        entry = part.index_entry(store.locate("dev-a")[1])
        assert entry is not None
        sizes = sum(len(k) + len(v) for k, v in want.items() if k[:16] == store.locate("dev-a")[1])
        assert (entry.device_id, entry.first_ns, entry.last_ns) == ("dev-a", 1000, 5000)
        assert (entry.count, entry.size, entry.dups) == (3, sizes, 1)
    finally:
        store.close()
