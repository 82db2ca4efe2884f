"""`Pending`: a message in the stored form's parts, made from a record or by the ingest path."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_backup.records import Record, encode_parts, encode_record, stored_flags, topic_field
from mqtt_backup.storage import Pending
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
