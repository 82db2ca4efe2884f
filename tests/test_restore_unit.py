"""The restore protocol without a broker: parsing, response topics, the service on a real store.

The store is real RocksDB in temp dirs, read through the writer's own handles as in the bridge;
only the network is faked, by a publisher that records what the service publishes.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mqtt_backup.errors import BrokerUnreachable, UsageError
from mqtt_backup.mqtt import REPLAY_PROPERTY, Delivery, Window
from mqtt_backup.records import Properties, Record, decode_fields
from mqtt_backup.restore import service as restore_module
from mqtt_backup.restore.reply import Pacer
from mqtt_backup.restore.request import (
    MAX_ID_CHARS,
    MAX_REQUEST_BYTES,
    BadRequest,
    Request,
    parse_request,
    response_topic,
)
from mqtt_backup.restore.service import CHUNK, FIRST_CHUNK, DroppedWatcher, RestoreService
from mqtt_backup.storage import Cursor, LiveReader, Pending, Store, ballast
from mqtt_backup.storage.journal import Gap, GapLog
from mqtt_backup.storage.store import CHUNK_BYTES
from mqtt_backup.times import format_ts
from mqtt_backup.topics import check_device, filter_matches

SEC = 10**9
BASE_NS = 1_767_225_600 * SEC  # 2026-01-01T00:00:00Z
FRAC = 123_456_789
PREFIX = "backup/restore"
REQUEST = f"{PREFIX}/dev-1"
DEFAULT_REPLY = f"{REQUEST}/response"
BINARY = bytes(range(256))
PROPS = Properties(
    payload_format=1,
    message_expiry=60,
    content_type="text/plain",
    response_topic="devices/dev-1/reply",
    correlation_data=b"\x00\x01",
    user=(("k", "v"), ("k", "v2")),
)
# dev-1: message i is received at T[i] = BASE + i s + FRAC ns.
DEV1 = (
    Record("devices/dev-1/telemetry", b'{"t":20.5}', qos=1),
    Record("devices/dev-1/status", b"online", qos=0, retain=True),
    Record("devices/dev-1/telemetry", BINARY, qos=1, dup=True),
    Record("devices/dev-1/telemetry", "héllo ✓".encode(), qos=1, properties=PROPS),
    Record("devices/dev-1/status", b"offline", qos=1, retain=True),
)
T = tuple(BASE_NS + i * SEC + FRAC for i in range(len(DEV1)))
DEV2_NS = BASE_NS + 100 * SEC


# ---- fakes and helpers --------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """One publish the service made."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: Properties | None

    @property
    def user(self) -> dict[str, str]:
        """User properties as a dict (the last value of a repeated key wins)."""
        return dict(self.props.user) if self.props is not None else {}

    @property
    def terminal(self) -> str | None:
        """'done' or 'error' for a terminal message, None for a stored message."""
        return self.user.get("mqtt-backup-terminal")

    def body(self) -> dict[str, Any]:
        """The JSON payload."""
        value = json.loads(self.payload)
        assert isinstance(value, dict)
        return value


class FakeConn:
    """Stands for the MQTT connection: records publishes in the order they are made."""

    def __init__(self, mqtt5: bool = True, delay: float = 0.0) -> None:
        self.mqtt5 = mqtt5
        self.delay = delay
        self.sent: list[Published] = []
        self.in_flight = 0
        self.peak = 0
        self.in_flight_at_terminal: list[int] = []

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        props: Properties | None = None,
    ) -> None:
        """Record, then take a little time as a PUBACK round trip would."""
        published = Published(topic, payload, qos, retain, props)
        if published.terminal is not None:
            self.in_flight_at_terminal.append(self.in_flight)
        self.sent.append(published)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1


def pending(store: Store, device: str, received_ns: int, record: Record) -> Pending:
    """A Pending placed the way ingest places it."""
    _, dev_key = store.locate(device)
    return Pending(device, dev_key, received_ns, record)


def write(store: Store, device: str, items: list[tuple[int, Record]]) -> None:
    """Store (received_ns, record) pairs of one device in one synced batch."""
    partition, _ = store.locate(device)
    store.write(partition, [pending(store, device, ns, rec) for ns, rec in items])


def _open_filled(data: Path) -> Store:
    """A 3-partition store holding DEV1 for dev-1 and three messages of dev-2; stays open."""
    opened = Store.open(data, partitions=3)
    write(opened, "dev-1", list(zip(T, DEV1, strict=True)))
    write(
        opened,
        "dev-2",
        [
            (DEV2_NS + i * SEC, Record("devices/dev-2/telemetry", f"d2-{i}".encode()))
            for i in range(3)
        ],
    )
    return opened


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, LiveReader]]:
    """One filled store and reader for the tests that only read (most of them).

    Opening a store per test was two thirds of this module's time. A test that writes messages,
    gaps or broker-drop files takes `own_store`/`own_reader` instead.
    """
    root = tmp_path_factory.mktemp("restore-unit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ballast, "MAX_BYTES", 1024 * 1024)  # as clean_env does for each test
        opened = _open_filled(root / "data")
    live = LiveReader(opened)
    before = {p.name for p in opened.data_dir.iterdir()}
    yield opened, live
    written = {p.name for p in opened.data_dir.iterdir()} - before
    live.close()
    opened.close()
    assert written == set(), f"a test wrote {written} beside the shared store: use own_reader"


@pytest.fixture
def store(shared: tuple[Store, LiveReader]) -> Store:
    """The shared store: read it, never write to it (use `own_store`)."""
    return shared[0]


@pytest.fixture
def reader(shared: tuple[Store, LiveReader]) -> LiveReader:
    """The shared store's reader, as the bridge's restore service has one (its data dir must not
    change: use `own_reader`)."""
    return shared[1]


@pytest.fixture
def own_store(data_dir: Path) -> Iterator[Store]:
    """A store of this test alone, filled as the shared one is."""
    opened = _open_filled(data_dir)
    yield opened
    opened.close()


@pytest.fixture
def own_reader(own_store: Store) -> Iterator[LiveReader]:
    """A reader of `own_store`, through its own handles."""
    opened = LiveReader(own_store)
    yield opened
    opened.close()


def ask(
    reader: LiveReader,
    payload: bytes = b"",
    *,
    topic: str = REQUEST,
    response: str | None = None,
    correlation: bytes | None = None,
    conn: FakeConn | None = None,
    **options: Any,
) -> list[Published]:
    """Answer one request with a fresh service on a fresh loop; everything it published."""
    conn = conn or FakeConn()

    async def run() -> None:
        service = RestoreService(reader, GapLog(reader.data_dir), **options)
        message = Delivery(
            topic=topic,
            payload=payload,
            qos=1,
            response_topic=response,
            correlation_data=correlation,
        )
        await service.answer(message, conn)

    asyncio.run(run())
    return conn.sent


def split(sent: list[Published]) -> tuple[list[Published], dict[str, Any]]:
    """(stored messages, terminal body); asserts exactly one terminal and that it comes last."""
    assert sent, "nothing was published"
    *messages, last = sent
    assert [m for m in messages if m.terminal is not None] == []
    assert last.terminal in ("done", "error")
    body = last.body()
    assert (last.terminal == "done") == ("done" in body)
    assert (last.terminal == "error") == ("error" in body)
    return messages, body


def stream(reader: LiveReader, fields: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    """JSON envelopes of a json/response request that must end in `done` with a matching count."""
    messages, done = split(ask(reader, json.dumps(fields).encode(), **kwargs))
    assert done.get("done") is True, done
    assert done["count"] == len(messages)
    return [m.body() for m in messages]


def payloads(bodies: list[dict[str, Any]]) -> list[bytes]:
    """The original payload bytes of JSON envelopes."""
    return [
        base64.b64decode(b["payload"]) if b["encoding"] == "base64" else b["payload"].encode()
        for b in bodies
    ]


def only_error(sent: list[Published]) -> str:
    """The reason of a stream that is exactly one error terminal and nothing else."""
    assert len(sent) == 1, sent
    messages, body = split(sent)
    assert messages == []
    assert isinstance(body["error"], str)
    assert body["error"]
    return body["error"]


def bad(payload: bytes, device: str = "dev-1") -> BadRequest:
    """The BadRequest that parse_request raises for a payload."""
    with pytest.raises(BadRequest) as caught:
        parse_request(device, payload)
    assert caught.value.reason == str(caught.value)
    return caught.value


def parsed(fields: dict[str, Any]) -> Request:
    """parse_request of a JSON object."""
    return parse_request("dev-1", json.dumps(fields).encode())


# ---- 1. parse_request ---------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b" ", b"\n\t \r\n"])
def test_empty_or_whitespace_payload_asks_for_everything(payload: bytes) -> None:
    assert parse_request("dev-1", payload) == Request("dev-1")


def test_empty_object_asks_for_everything() -> None:
    assert parse_request("dev-1", b"{}") == Request("dev-1")
    assert parse_request("dev-1", b" {} \n") == Request("dev-1")


def test_every_field() -> None:
    request = parsed(
        {
            "since": "2026-01-01T00:00:00Z",
            "until": 1767225601.5,
            "topic": "devices/+/telemetry",
            "limit": 7,
            "order": "desc",
            "mode": "replay",
            "format": "raw",
            "id": "req-1",
            "rate": 12.5,
            "retain": True,
        }
    )
    assert request == Request(
        device="dev-1",
        since_ns=BASE_NS,
        until_ns=BASE_NS + SEC + SEC // 2,
        topic="devices/+/telemetry",
        limit=7,
        descending=True,
        replay=True,
        raw=True,
        request_id="req-1",
        rate=12.5,
        retain=True,
    )


def test_defaults() -> None:
    request = parsed({"order": "asc", "mode": "response", "format": "json", "retain": False})
    assert request == Request("dev-1")


def test_unicode_device_is_kept() -> None:
    assert parse_request("Gerät-温度", b"").device == "Gerät-温度"


@pytest.mark.parametrize(
    ("value", "ns"),
    [
        ("2026-01-01T00:00:00Z", BASE_NS),
        ("2026-01-01T00:00:00z", BASE_NS),
        ("2026-01-01T00:00:00+00:00", BASE_NS),
        ("2026-01-01T01:00:00+01:00", BASE_NS),
        ("2025-12-31T19:30:00-04:30", BASE_NS),
        ("2026-01-01T00:00:00.5Z", BASE_NS + SEC // 2),
        ("2026-01-01T00:00:00.123456789Z", BASE_NS + FRAC),
        ("2026-01-01T02:00:00.000000001+02:00", BASE_NS + 1),
        ("1970-01-01T00:00:00Z", 0),
        (1_767_225_600, BASE_NS),
        (0, 0),
        (1_767_225_600.25, BASE_NS + SEC // 4),
        (1_767_225_600.5, BASE_NS + SEC // 2),
    ],
)
@pytest.mark.parametrize("name", ["since", "until"])
def test_times(name: str, value: str | float, ns: int) -> None:
    request = parsed({name: value})
    assert (request.since_ns if name == "since" else request.until_ns) == ns


def test_time_fields_are_independent() -> None:
    request = parsed({"since": "2026-01-01T00:00:00Z", "until": "2026-01-01T00:00:01Z"})
    assert (request.since_ns, request.until_ns) == (BASE_NS, BASE_NS + SEC)


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "",
        "2026-01-01T00:00:00",  # no time zone
        "2026-13-01T00:00:00Z",
        "2026-01-01T25:00:00Z",
        "1969-12-31T23:59:59Z",
        -1,
        -0.5,
        True,
        False,
        [],
        {},
        10**30,
    ],
)
@pytest.mark.parametrize("name", ["since", "until"])
def test_bad_times(name: str, value: Any) -> None:
    error = bad(json.dumps({name: value}).encode())
    assert name in error.reason


def test_since_after_until_is_an_error() -> None:
    error = bad(b'{"since": 1767225601, "until": 1767225600}')
    assert "'since' is after 'until'" in error.reason


def test_since_after_until_by_one_nanosecond_is_an_error() -> None:
    error = bad(b'{"since": "2026-01-01T00:00:00.000000001Z", "until": "2026-01-01T00:00:00Z"}')
    assert "after" in error.reason


def test_since_equal_until_is_allowed() -> None:
    request = parsed({"since": "2026-01-01T01:00:00+01:00", "until": 1_767_225_600})
    assert request.since_ns == request.until_ns == BASE_NS


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-24.5T10:00:00Z",  # a fraction on the date, not on the seconds
        "2026-11-24T10:00:00+05:30.5",  # a fraction after the offset
    ],
)
def test_malformed_rfc3339_is_refused_not_shifted(value: str) -> None:
    # A fraction belongs to the seconds only: these were once read as 10:00:00.5.
    assert "RFC 3339" in bad(json.dumps({"since": value}).encode()).reason


def test_comma_fraction_is_refused() -> None:
    # RFC 3339 has no comma fraction (Python's fromisoformat takes one, and 10:00:00,5Z was once
    # read as 10:00:00Z, the fraction silently dropped).
    assert "RFC 3339" in bad(b'{"since": "2026-01-01T00:00:00,5Z"}').reason


@pytest.mark.parametrize("value", ["#", "+", "devices/+/telemetry", "devices/#", "a/b/c", "$SYS/#"])
def test_topic_filters(value: str) -> None:
    assert parsed({"topic": value}).topic == value


@pytest.mark.parametrize("value", ["", "a/#/b", "#/a", "a#", "a/b+", "+a/b", 5, ["a"], True])
def test_bad_topic_filters(value: Any) -> None:
    error = bad(json.dumps({"topic": value}).encode())
    assert "topic" in error.reason


@pytest.mark.parametrize("value", [1, 2, 10**12])
def test_limit(value: int) -> None:
    assert parsed({"limit": value}).limit == value


@pytest.mark.parametrize("value", [0, -1, 1.5, True, False, "5", [5], {}])
def test_bad_limit(value: Any) -> None:
    assert "'limit' must be an integer >= 1" in bad(json.dumps({"limit": value}).encode()).reason


@pytest.mark.parametrize(
    ("name", "good", "flag"),
    [
        ("order", ("asc", "desc"), "descending"),
        ("mode", ("response", "replay"), "replay"),
        ("format", ("json", "raw"), "raw"),
    ],
)
def test_choices(name: str, good: tuple[str, str], flag: str) -> None:
    assert getattr(parsed({name: good[0]}), flag) is False
    assert getattr(parsed({name: good[1]}), flag) is True
    for wrong in (good[0].upper(), " " + good[1], "other", 1, True, [good[0]]):
        error = bad(json.dumps({name: wrong}).encode())
        assert repr(name) in error.reason
        assert repr(good[0]) in error.reason
        assert repr(good[1]) in error.reason


def test_id_is_kept() -> None:
    assert parsed({"id": "abc-1"}).request_id == "abc-1"
    assert parsed({"id": "Gerät ✓"}).request_id == "Gerät ✓"
    assert parsed({"id": "x" * MAX_ID_CHARS}).request_id == "x" * MAX_ID_CHARS


@pytest.mark.parametrize("value", [5, 1.5, True, ["a"], {"a": 1}, "x" * (MAX_ID_CHARS + 1)])
def test_bad_id(value: Any) -> None:
    error = bad(json.dumps({"id": value}).encode())
    assert "'id'" in error.reason
    assert error.request_id is None


@pytest.mark.parametrize("value", [0.01, 0.5, 1, 200, 1e6])
def test_rate(value: float) -> None:
    assert parsed({"rate": value}).rate == float(value)


@pytest.mark.parametrize("value", [0, 0.0, 0.001, 1e-300, -1, -0.5, "x", "5", True, False, [1], {}])
def test_bad_rate(value: Any) -> None:
    assert "'rate' must be" in bad(json.dumps({"rate": value}).encode()).reason


def test_retain() -> None:
    assert parsed({"retain": True}).retain is True
    assert parsed({"retain": False}).retain is False


@pytest.mark.parametrize("value", ["true", 1, 0, [], {}])
def test_bad_retain(value: Any) -> None:
    assert "'retain' must be true or false" in bad(json.dumps({"retain": value}).encode()).reason


def test_payload_of_exactly_64_kib_is_fine() -> None:
    head = b'{"limit": 3}'
    payload = head + b" " * (MAX_REQUEST_BYTES - len(head))
    assert len(payload) == 64 * 1024
    assert parse_request("dev-1", payload).limit == 3


def test_whitespace_of_exactly_64_kib_is_everything() -> None:
    assert parse_request("dev-1", b" " * MAX_REQUEST_BYTES) == Request("dev-1")


@pytest.mark.parametrize("filler", [b" ", b"x"])
def test_payload_over_64_kib_is_refused(filler: bytes) -> None:
    head = b'{"limit": 3}'
    payload = head + filler * (MAX_REQUEST_BYTES + 1 - len(head))
    error = bad(payload)
    assert str(MAX_REQUEST_BYTES + 1) in error.reason
    assert str(MAX_REQUEST_BYTES) in error.reason


@pytest.mark.parametrize("payload", [b"\xff", b'{"id": "\xc3"}', b"\xed\xa0\x80", b"\x80{}"])
def test_not_utf8(payload: bytes) -> None:
    assert "UTF-8" in bad(payload).reason


@pytest.mark.parametrize(
    "payload", [b"{", b"{'a': 1}", b"limit=5", b'{"limit": 5,}', b"{} {}", b'{"a" 1}', b"\x00"]
)
def test_not_json(payload: bytes) -> None:
    assert "not valid JSON" in bad(payload).reason


@pytest.mark.parametrize(
    "payload", [b"[]", b"[1, 2]", b"5", b"1.5", b'"everything"', b"null", b"true"]
)
def test_not_an_object(payload: bytes) -> None:
    assert "must be a JSON object" in bad(payload).reason


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 10_000,
        b"[" * 10_000 + b"]" * 10_000,  # valid JSON, too deep
        b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
        b"[" * (MAX_REQUEST_BYTES),
    ],
)
def test_deeply_nested_json(payload: bytes) -> None:
    assert "nested too deeply" in bad(payload).reason


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("name", ["since", "until", "rate", "limit", "unknown"])
def test_nan_and_infinity_literals(name: str, literal: str) -> None:
    error = bad(f'{{"{name}": {literal}}}'.encode())
    assert literal.lstrip("-") in error.reason


def test_duplicate_keys() -> None:
    error = bad(b'{"limit": 1, "limit": 2}')
    assert "'limit'" in error.reason
    assert "twice" in error.reason


def test_duplicate_id_carries_no_id() -> None:
    assert bad(b'{"id": "a", "id": "b"}').request_id is None


@pytest.mark.parametrize(
    ("payload", "request_id"),
    [
        (b'{"id": "x", "rate": Infinity}', "x"),
        (b'{"rate": NaN, "id": "y"}', "y"),
        (b'{"id": "z", "limit": 1, "limit": 2}', "z"),
        (b'{"id": "a", "id": "b", "rate": Infinity}', None),
        (b'{"id": 5, "rate": NaN}', None),
        (b'{"id": "x", "rate": 1,}', None),  # not JSON even leniently
        (b'{"id": "x", "t": "\xff"}', None),  # not UTF-8
        (b"[Infinity]", None),
    ],
)
def test_a_refused_payload_keeps_the_id_a_lenient_read_finds(
    payload: bytes, request_id: str | None
) -> None:
    assert bad(payload).request_id == request_id


def test_an_error_reply_carries_the_id_of_a_payload_with_infinity(reader: LiveReader) -> None:
    # `restore --rate inf` once sent this: without its id, the client waited and exited 3.
    sent = ask(reader, b'{"id": "r-inf", "mode": "replay", "rate": Infinity}')
    only_error(sent)
    assert sent[0].body()["id"] == "r-inf"


def test_unknown_field_is_named() -> None:
    error = bad(b'{"limt": 5}')
    assert "'limt'" in error.reason
    assert "limit" in error.reason  # the known fields are listed


def test_every_unknown_field_is_named() -> None:
    error = bad(b'{"zeta": 1, "alpha": 2, "limit": 1}')
    assert "'alpha', 'zeta'" in error.reason


def test_empty_device() -> None:
    assert "no device" in bad(b"", device="").reason
    bad(b'{"limit": 1}', device="")


@pytest.mark.parametrize(
    "fields",
    [
        {"limit": 0},
        {"limt": 1},
        {"since": 2, "until": 1},
        {"topic": "a/#/b"},
        {"order": "up"},
        {"mode": "copy"},
        {"format": "csv"},
        {"rate": 0},
        {"retain": "yes"},
        {"since": "soon"},
    ],
)
def test_bad_request_carries_a_valid_id(fields: dict[str, Any]) -> None:
    error = bad(json.dumps({"id": "req-7", **fields}).encode())
    assert error.request_id == "req-7"
    error = bad(json.dumps({**fields, "id": "req-8"}).encode())
    assert error.request_id == "req-8"


# ---- 2. response_topic --------------------------------------------------------------------------


def test_no_response_topic_answers_below_the_request() -> None:
    assert response_topic(REQUEST, None, PREFIX) == (DEFAULT_REPLY, None)
    assert response_topic(REQUEST, None, PREFIX, any_allowed=True) == (DEFAULT_REPLY, None)


@pytest.mark.parametrize(
    "given", [f"{REQUEST}/x", f"{REQUEST}/response", f"{REQUEST}/a/b/c", f"{REQUEST}//x"]
)
def test_response_topic_below_the_requested_device(given: str) -> None:
    assert response_topic(REQUEST, given, PREFIX) == (given, None)


@pytest.mark.parametrize(
    "given",
    [
        f"{PREFIX}/dev",  # looks like a request
        f"{PREFIX}/dev-1",  # is the request topic itself
        f"{PREFIX}/dev-1/",  # no level below the device
        f"{PREFIX}/dev/x",  # another device's subtree
        f"{PREFIX}/dev-10/x",  # a device whose id starts like ours
        f"{PREFIX}/other/a/b/c",
        PREFIX,
        "backup",
        "other/topic",
        "backup/restorex/dev/x",
        f"x/{PREFIX}/dev/x",
        f"x/{REQUEST}/x",
    ],
)
def test_response_topic_refused(given: str) -> None:
    topic, reason = response_topic(REQUEST, given, PREFIX)
    assert topic == DEFAULT_REPLY
    assert reason is not None
    assert given in reason


@pytest.mark.parametrize("given", ["other/topic", "a", f"{PREFIX}/dev/x"])
def test_any_response_topic_when_allowed(given: str) -> None:
    assert response_topic(REQUEST, given, PREFIX, any_allowed=True) == (given, None)


def test_a_request_topic_is_never_a_response_topic() -> None:
    # Answers there would be read as new requests: refused even when any topic is allowed.
    topic, reason = response_topic(REQUEST, f"{PREFIX}/dev", PREFIX, any_allowed=True)
    assert topic == DEFAULT_REPLY
    assert reason is not None


@pytest.mark.parametrize("given", ["", "a/+", "a/#", "#", "+", f"{PREFIX}/dev/+", "a+b/c"])
@pytest.mark.parametrize("any_allowed", [False, True])
def test_response_topic_must_be_a_topic_name(given: str, any_allowed: bool) -> None:
    topic, reason = response_topic(REQUEST, given, PREFIX, any_allowed)
    assert topic == DEFAULT_REPLY
    assert reason is not None


def test_response_topic_follows_the_namespace() -> None:
    assert response_topic("ns/a/restore/d", "ns/a/restore/d/r", "ns/a/restore") == (
        "ns/a/restore/d/r",
        None,
    )
    assert response_topic("ns/a/restore/d", "backup/restore/d/r", "ns/a/restore")[1] is not None


# ---- 3. the service on a real store -------------------------------------------------------------


def test_everything_as_json_envelopes(reader: LiveReader) -> None:
    sent = ask(reader)
    messages, done = split(sent)
    assert done == {"done": True, "protocol": 1, "device": "dev-1", "count": 5, "complete": True}
    assert all(m.topic == DEFAULT_REPLY for m in sent)
    assert all(m.qos == 1 and m.retain is False for m in sent)
    # Data messages carry only the correlation data (cheap for clients); terminals say JSON.
    assert all(m.props is not None and m.props.content_type is None for m in sent[:-1])
    assert sent[-1].props is not None
    assert sent[-1].props.content_type == "application/json"
    bodies = [m.body() for m in messages]
    assert bodies[0] == {
        "seq": 1,
        "device": "dev-1",
        "topic": "devices/dev-1/telemetry",
        "ts": "2026-01-01T00:00:00.123456789Z",
        "qos": 1,
        "retain": False,
        "dup": False,
        "encoding": "utf8",
        "payload": '{"t":20.5}',
    }
    assert [b["seq"] for b in bodies] == [1, 2, 3, 4, 5]
    assert [b["ts"] for b in bodies] == [format_ts(t) for t in T]
    assert [b["topic"] for b in bodies] == [r.topic for r in DEV1]
    assert [b["qos"] for b in bodies] == [r.qos for r in DEV1]
    assert [b["retain"] for b in bodies] == [r.retain for r in DEV1]
    assert [b["dup"] for b in bodies] == [r.dup for r in DEV1]
    assert [b["encoding"] for b in bodies] == ["utf8", "utf8", "base64", "utf8", "utf8"]
    assert payloads(bodies) == [r.payload for r in DEV1]
    assert all("id" not in b for b in [*bodies, done])
    assert all(b["device"] == "dev-1" for b in bodies)


def test_envelope_ts_has_nine_digits(reader: LiveReader) -> None:
    for body in stream(reader, {}):
        ts = body["ts"]
        assert ts.endswith("Z")
        assert len(ts.split(".")[1]) == 10  # nine digits and the Z


def test_binary_payload_round_trips_exactly(reader: LiveReader) -> None:
    body = stream(reader, {})[2]
    assert body["encoding"] == "base64"
    assert base64.b64decode(body["payload"], validate=True) == BINARY


def test_unicode_payload_and_properties(reader: LiveReader) -> None:
    body = stream(reader, {})[3]
    assert (body["encoding"], body["payload"]) == ("utf8", "héllo ✓")
    assert body["properties"] == {
        "content_type": "text/plain",
        "payload_format": 1,
        "message_expiry": 60,
        "response_topic": "devices/dev-1/reply",
        "correlation_data": base64.b64encode(b"\x00\x01").decode(),
        "user_properties": [["k", "v"], ["k", "v2"]],
    }


def test_id_in_every_message_when_requested(reader: LiveReader) -> None:
    sent = ask(reader, b'{"id": "req-42"}')
    messages, done = split(sent)
    assert len(messages) == 5
    for published in sent:
        body = published.body()
        assert next(iter(body)) == "id"
        assert body["id"] == "req-42"
    assert done == {
        "id": "req-42",
        "done": True,
        "protocol": 1,
        "device": "dev-1",
        "count": 5,
        "complete": True,
    }


def test_correlation_data_and_response_topic_on_every_message(reader: LiveReader) -> None:
    reply = f"{PREFIX}/dev-1/mine"
    sent = ask(reader, b'{"limit": 3}', response=reply, correlation=b"\x00corr\xff")
    split(sent)
    assert len(sent) == 4
    for published in sent:
        assert published.topic == reply
        assert published.props is not None
        assert published.props.correlation_data == b"\x00corr\xff"


def test_no_correlation_data_when_the_request_had_none(reader: LiveReader) -> None:
    sent = ask(reader)
    assert all(p.props is not None and p.props.correlation_data is None for p in sent)


def test_limit_in_the_service(reader: LiveReader) -> None:
    assert payloads(stream(reader, {"limit": 2})) == [DEV1[0].payload, DEV1[1].payload]
    assert len(stream(reader, {"limit": 1})) == 1
    assert len(stream(reader, {"limit": 5})) == 5
    assert len(stream(reader, {"limit": 500})) == 5


def test_desc(reader: LiveReader) -> None:
    bodies = stream(reader, {"order": "desc"})
    assert payloads(bodies) == [r.payload for r in reversed(DEV1)]
    assert [b["seq"] for b in bodies] == [1, 2, 3, 4, 5]
    assert [b["ts"] for b in bodies] == [format_ts(t) for t in reversed(T)]


def test_desc_with_limit_gives_the_newest(reader: LiveReader) -> None:
    bodies = stream(reader, {"order": "desc", "limit": 2})
    assert payloads(bodies) == [DEV1[4].payload, DEV1[3].payload]


@pytest.mark.parametrize(
    ("topic", "expect"),
    [
        ("devices/dev-1/status", [1, 4]),
        ("devices/dev-1/telemetry", [0, 2, 3]),
        ("+/+/telemetry", [0, 2, 3]),
        ("devices/#", [0, 1, 2, 3, 4]),
        ("#", [0, 1, 2, 3, 4]),
        ("devices/dev-2/#", []),
        ("devices/dev-1", []),
    ],
)
def test_topic_filter(reader: LiveReader, topic: str, expect: list[int]) -> None:
    bodies = stream(reader, {"topic": topic})
    assert payloads(bodies) == [DEV1[i].payload for i in expect]
    assert [b["seq"] for b in bodies] == list(range(1, len(expect) + 1))


def test_topic_filter_with_limit_and_desc(reader: LiveReader) -> None:
    bodies = stream(reader, {"topic": "devices/dev-1/telemetry", "order": "desc", "limit": 2})
    assert payloads(bodies) == [DEV1[3].payload, DEV1[2].payload]


@pytest.mark.parametrize(
    ("since", "until", "expect"),
    [
        # since inclusive, until exclusive, to the nanosecond
        (format_ts(T[1]), format_ts(T[3]), [1, 2]),
        (format_ts(T[1] + 1), format_ts(T[3] + 1), [2, 3]),
        ("2026-01-01T01:00:01.123456789+01:00", None, [1, 2, 3, 4]),
        (None, "2025-12-31T19:00:02.123456789-05:00", [0, 1]),
        (1_767_225_601, 1_767_225_603, [1, 2]),
        (1_767_225_601.5, None, [2, 3, 4]),
        (None, 1_767_225_600, []),
        (1_767_225_610, None, []),
        (0, None, [0, 1, 2, 3, 4]),
    ],
)
def test_time_window(
    reader: LiveReader, since: str | float | None, until: str | float | None, expect: list[int]
) -> None:
    fields = {k: v for k, v in (("since", since), ("until", until)) if v is not None}
    bodies = stream(reader, fields)
    assert payloads(bodies) == [DEV1[i].payload for i in expect]


def test_time_window_desc(reader: LiveReader) -> None:
    bodies = stream(reader, {"since": format_ts(T[1]), "until": format_ts(T[4]), "order": "desc"})
    assert payloads(bodies) == [DEV1[i].payload for i in (3, 2, 1)]


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_since_equal_until_is_done_with_nothing(reader: LiveReader, order: str) -> None:
    at = format_ts(T[2])  # exactly on a stored message
    sent = ask(reader, json.dumps({"since": at, "until": at, "order": order}).encode())
    messages, done = split(sent)
    assert messages == []
    assert done == {"done": True, "protocol": 1, "device": "dev-1", "count": 0, "complete": True}


def test_since_after_until_is_one_error(reader: LiveReader) -> None:
    fields = {"since": format_ts(T[3]), "until": format_ts(T[1]), "id": "w"}
    sent = ask(reader, json.dumps(fields).encode())
    assert "'since' is after 'until'" in only_error(sent)
    assert sent[0].body()["id"] == "w"


def test_other_device_is_separate(reader: LiveReader) -> None:
    sent = ask(reader, topic=f"{PREFIX}/dev-2")
    messages, done = split(sent)
    assert done == {"done": True, "protocol": 1, "device": "dev-2", "count": 3, "complete": True}
    bodies = [m.body() for m in messages]
    assert payloads(bodies) == [b"d2-0", b"d2-1", b"d2-2"]
    assert all(b["device"] == "dev-2" for b in bodies)
    assert all(m.topic == f"{PREFIX}/dev-2/response" for m in sent)


@pytest.mark.parametrize("device", ["nobody", "dev-", "dev-10", "Gerät ✓"])
def test_unknown_device_is_done_with_nothing(reader: LiveReader, device: str) -> None:
    sent = ask(reader, topic=f"{PREFIX}/{device}")
    assert len(sent) == 1
    assert split(sent)[1] == {
        "done": True,
        "protocol": 1,
        "device": device,
        "count": 0,
        "complete": True,
    }
    assert sent[0].topic == f"{PREFIX}/{device}/response"


def test_raw_format(reader: LiveReader) -> None:
    reply = f"{PREFIX}/dev-1/raw"
    sent = ask(reader, b'{"format": "raw", "id": "r"}', response=reply, correlation=b"c1")
    messages, done = split(sent)
    assert done == {
        "id": "r",
        "done": True,
        "protocol": 1,
        "device": "dev-1",
        "count": 5,
        "complete": True,
    }
    assert [m.payload for m in messages] == [r.payload for r in DEV1]
    assert all(p.topic == reply and p.qos == 1 and p.retain is False for p in sent)
    for seq, (published, record, ts) in enumerate(zip(messages, DEV1, T, strict=True), 1):
        assert published.props is not None
        assert published.props.correlation_data == b"c1"
        user = published.props.user
        assert user[:8] == (
            ("mqtt-backup-seq", str(seq)),
            ("mqtt-backup-device", "dev-1"),
            ("mqtt-backup-topic", record.topic),
            ("mqtt-backup-ts", format_ts(ts)),
            ("mqtt-backup-qos", str(record.qos)),
            ("mqtt-backup-retain", "true" if record.retain else "false"),
            ("mqtt-backup-dup", "true" if record.dup else "false"),
            ("mqtt-backup-id", "r"),
        )
        original = record.properties
        assert user[8:] == (original.user if original else ())
        assert published.props.content_type == (original.content_type if original else None)
        assert published.props.payload_format == (original.payload_format if original else None)


def test_raw_format_without_id_has_no_id_property(reader: LiveReader) -> None:
    messages, _ = split(ask(reader, b'{"format": "raw", "limit": 1}'))
    assert len(messages) == 1
    assert "mqtt-backup-id" not in messages[0].user
    assert messages[0].payload == DEV1[0].payload


def replayed(sent: list[Published]) -> tuple[list[Published], dict[str, Any]]:
    """(replayed messages, done) of a replay that ends in `done` on the default reply topic."""
    messages, done = split(sent)
    assert done.get("done") is True, done
    assert sent[-1].topic == DEFAULT_REPLY
    return messages, done


def test_replay(reader: LiveReader) -> None:
    sent = ask(reader, b'{"mode": "replay"}', correlation=b"k")
    messages, done = replayed(sent)
    assert done == {"done": True, "protocol": 1, "device": "dev-1", "count": 5, "complete": True}
    assert [m.topic for m in messages] == [r.topic for r in DEV1]
    assert [m.payload for m in messages] == [r.payload for r in DEV1]
    assert [m.qos for m in messages] == [r.qos for r in DEV1]
    assert [m.retain for m in messages] == [False] * 5  # never overwrites a retained value
    for published, ts in zip(messages, T, strict=True):
        assert published.props is not None
        user = published.props.user
        assert user[:2] == ((REPLAY_PROPERTY, "1"), ("mqtt-backup-ts", format_ts(ts)))
    assert REPLAY_PROPERTY == "mqtt-backup-replay"
    assert sent[-1].props is not None
    assert sent[-1].props.correlation_data == b"k"


def test_replay_keeps_the_original_properties(reader: LiveReader) -> None:
    messages, _ = replayed(ask(reader, b'{"mode": "replay"}'))
    assert messages[3].props == Properties(
        correlation_data=PROPS.correlation_data,
        user=((REPLAY_PROPERTY, "1"), ("mqtt-backup-ts", format_ts(T[3])), *PROPS.user),
        content_type=PROPS.content_type,
        payload_format=PROPS.payload_format,
        message_expiry=PROPS.message_expiry,
        response_topic=PROPS.response_topic,
    )
    assert messages[0].props == Properties(
        user=((REPLAY_PROPERTY, "1"), ("mqtt-backup-ts", format_ts(T[0])))
    )


def test_replay_with_retain_keeps_stored_retain_flags(reader: LiveReader) -> None:
    messages, _ = replayed(ask(reader, b'{"mode": "replay", "retain": true}'))
    assert [m.retain for m in messages] == [r.retain for r in DEV1]


def test_replay_with_filter_limit_and_desc(reader: LiveReader) -> None:
    request = b'{"mode": "replay", "topic": "devices/dev-1/status", "order": "desc", "limit": 1}'
    messages, done = replayed(ask(reader, request))
    assert [(m.topic, m.payload) for m in messages] == [("devices/dev-1/status", b"offline")]
    assert done["count"] == 1


class FakeClock:
    """A clock that only moves when something sleeps: pacing checked without wall time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay


@pytest.fixture
def paced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float | None, FakeClock]]:
    """Every Pacer the service builds runs on a FakeClock; returns (rate, clock) per pacer."""
    built: list[tuple[float | None, FakeClock]] = []

    def fake_pacer(rate: float | None) -> Pacer:
        clock = FakeClock()
        built.append((rate, clock))
        return Pacer(rate, clock, clock.sleep)

    monkeypatch.setattr(restore_module, "Pacer", fake_pacer)
    return built


def test_replay_rate_is_held(
    reader: LiveReader, paced: list[tuple[float | None, FakeClock]]
) -> None:
    messages, _ = replayed(ask(reader, b'{"mode": "replay", "rate": 100}'))
    assert len(messages) == 5
    [(rate, clock)] = paced
    assert rate == 100
    assert clock.sleeps == pytest.approx([0.01] * 4)  # message k waits for start + k/100


def test_rate_does_not_slow_a_response(
    reader: LiveReader, paced: list[tuple[float | None, FakeClock]]
) -> None:
    assert len(stream(reader, {"rate": 1})) == 5
    [(rate, clock)] = paced
    assert rate is None, "rate applies to replays only"
    assert clock.sleeps == []


@pytest.mark.parametrize("fields", [{"mode": "replay"}, {"format": "raw"}])
def test_replay_and_raw_need_mqtt5(reader: LiveReader, fields: dict[str, Any]) -> None:
    conn = FakeConn(mqtt5=False)
    sent = ask(reader, json.dumps({**fields, "id": "v3"}).encode(), conn=conn)
    assert "MQTT 5" in only_error(sent)
    assert sent[0].topic == DEFAULT_REPLY
    assert sent[0].body()["id"] == "v3"


def test_json_response_works_on_mqtt_3(reader: LiveReader) -> None:
    sent = ask(reader, b'{"id": "v3"}', conn=FakeConn(mqtt5=False))
    messages, done = split(sent)
    assert len(messages) == 5
    assert done["count"] == 5


def test_retained_request_is_ignored(reader: LiveReader) -> None:
    retained = FakeConn()
    live = FakeConn()

    async def run() -> None:
        service = RestoreService(reader, GapLog(reader.data_dir))
        service.submit(Delivery(REQUEST, b"", qos=1, retain=True), retained)
        # The marker: the same request, live and submitted after. An answer to the retained one
        # would be the same work started first on this loop, so it would end before this one.
        service.submit(Delivery(REQUEST, b"", qos=1, retain=False), live)
        for _ in range(500):
            if live.sent and live.sent[-1].terminal is not None:
                break
            await asyncio.sleep(0.01)
        await service.stop()

    asyncio.run(run())
    assert retained.sent == []
    assert split(live.sent)[1]["count"] == 5


def test_gaps_overlapping_the_window_make_it_incomplete(own_reader: LiveReader) -> None:
    log = GapLog(own_reader.data_dir)
    inside = Gap(T[1] - SEC // 2, T[1] + SEC // 2, "session-lost")
    across_start = Gap(T[0] - 10 * SEC, T[0] + 1, "downtime")
    before = Gap(T[0] - 10 * SEC, T[0] - 5 * SEC, "downtime")
    ends_at_since = Gap(T[0] - SEC, T[0], "broker-dropped")  # [since, until) touch, no overlap
    starts_at_until = Gap(T[3], T[3] + SEC, "broker-dropped")
    after = Gap(T[4] + SEC, T[4] + 2 * SEC, "session-lost")
    for gap in (inside, across_start, before, ends_at_since, starts_at_until, after):
        log.record(gap)
    fields = {"since": format_ts(T[0]), "until": format_ts(T[3])}
    messages, done = split(ask(own_reader, json.dumps(fields).encode()))
    assert len(messages) == 3
    assert done == {
        "done": True, "protocol": 1,
        "device": "dev-1",
        "count": 3,
        "complete": False,
        "gaps": [
            {"since": format_ts(inside.since_ns), "until": format_ts(inside.until_ns),
             "reason": "session-lost"},
            {"since": format_ts(across_start.since_ns), "until": format_ts(T[0] + 1),
             "reason": "downtime"},
        ],
    }  # fmt: skip
    assert done["gaps"][0]["since"] == "2026-01-01T00:00:00.623456789Z"


def test_gaps_outside_the_window_leave_it_complete(own_reader: LiveReader) -> None:
    log = GapLog(own_reader.data_dir)
    log.record(Gap(T[0] - 10 * SEC, T[0] - 5 * SEC, "downtime"))
    log.record(Gap(T[4] + SEC, T[4] + 2 * SEC, "session-lost"))
    fields = {"since": format_ts(T[0]), "until": format_ts(T[4] + 1)}
    assert split(ask(own_reader, json.dumps(fields).encode()))[1]["complete"] is True


def test_every_gap_counts_without_a_window(own_reader: LiveReader) -> None:
    log = GapLog(own_reader.data_dir)
    log.record(Gap(1, 2, "downtime"))
    log.record(Gap(T[4] + SEC, T[4] + 2 * SEC, "broker-dropped"))
    done = split(ask(own_reader, b'{"id": "g"}'))[1]
    assert done["complete"] is False
    assert done["gaps"] == [
        {"since": format_ts(1), "until": format_ts(2), "reason": "downtime"},
        {"since": format_ts(T[4] + SEC), "until": format_ts(T[4] + 2 * SEC),
         "reason": "broker-dropped"},
    ]  # fmt: skip
    assert done["id"] == "g"


def test_gaps_are_reported_for_an_unknown_device_too(own_reader: LiveReader) -> None:
    GapLog(own_reader.data_dir).record(Gap(T[0], T[1], "session-lost"))
    done = split(ask(own_reader, topic=f"{PREFIX}/nobody"))[1]
    assert (done["count"], done["complete"]) == (0, False)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"limt": 5}', "'limt'"),
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b"null", "JSON object"),
        (b'{"since": NaN}', "NaN"),
        (b'{"limit": 1, "limit": 1}', "twice"),
        (b"[" * 10_000, "nested too deeply"),
        (b'{"limit": 0}', "'limit'"),
        (b'{"topic": "a/#/b"}', "a/#/b"),
        (b'{"order": "newest"}', "'order'"),
        (b'{"mode": "copy"}', "'mode'"),
        (b'{"format": "xml"}', "'format'"),
        (b'{"rate": -1}', "'rate'"),
        (b'{"retain": 1}', "'retain'"),
        (b'{"id": 7}', "'id'"),
        (b'{"since": "soon"}', "soon"),
        (b" " * (MAX_REQUEST_BYTES + 1), "bytes"),
    ],
)
def test_bad_request_is_one_error_and_nothing_else(
    reader: LiveReader, payload: bytes, reason: str
) -> None:
    sent = ask(reader, payload, correlation=b"bad")
    assert reason in only_error(sent)
    assert sent[0].topic == DEFAULT_REPLY
    assert sent[0].props is not None
    assert sent[0].props.correlation_data == b"bad"
    assert "id" not in sent[0].body()


def test_bad_request_error_carries_the_id(reader: LiveReader) -> None:
    sent = ask(reader, b'{"id": "req-9", "limt": 5}')
    only_error(sent)
    body = sent[0].body()
    assert list(body) == ["id", "error", "protocol"]
    assert body["id"] == "req-9"
    assert "'limt'" in body["error"]


def test_refused_response_topic_is_one_error_on_the_default_topic(reader: LiveReader) -> None:
    sent = ask(reader, b'{"id": "t"}', response="other/topic", correlation=b"c")
    assert "other/topic" in only_error(sent)
    assert sent[0].topic == DEFAULT_REPLY
    assert sent[0].body()["id"] == "t"
    assert sent[0].props is not None
    assert sent[0].props.correlation_data == b"c"


def test_response_topic_under_another_device_is_refused(reader: LiveReader) -> None:
    # dev-1's requester must not plant answers (or read dev-1's history) in dev-2's subtree.
    sent = ask(reader, b'{"id": "x"}', response=f"{PREFIX}/dev-2/r/x", correlation=b"c")
    assert f"{PREFIX}/dev-2/r/x" in only_error(sent)
    assert sent[0].topic == DEFAULT_REPLY
    assert sent[0].body()["id"] == "x"


def test_response_topic_under_another_device_when_any_is_allowed(reader: LiveReader) -> None:
    sent = ask(reader, b"", response=f"{PREFIX}/dev-2/r/x", any_response_topic=True)
    split(sent)
    assert {p.topic for p in sent} == {f"{PREFIX}/dev-2/r/x"}


def test_any_response_topic_when_the_operator_allows_it(reader: LiveReader) -> None:
    sent = ask(reader, b"", response="my/inbox", any_response_topic=True)
    split(sent)
    assert {p.topic for p in sent} == {"my/inbox"}


def test_request_without_device_is_one_error(reader: LiveReader) -> None:
    sent = ask(reader, b"", topic=f"{PREFIX}/")
    assert "no device" in only_error(sent)
    assert sent[0].topic == f"{PREFIX}//response"


def test_namespace_is_honoured(reader: LiveReader) -> None:
    sent = ask(reader, b'{"limit": 1}', topic="site/a/restore/dev-1", namespace="site/a")
    messages, done = split(sent)
    assert (len(messages), done["device"]) == (1, "dev-1")
    assert {p.topic for p in sent} == {"site/a/restore/dev-1/response"}


def test_writes_after_the_reader_opened_are_seen(own_store: Store, own_reader: LiveReader) -> None:
    assert len(stream(own_reader, {})) == 5
    late = Record("devices/dev-1/late", b"late")
    write(own_store, "dev-1", [(BASE_NS + 200 * SEC, late)])
    write(own_store, "dev-3", [(BASE_NS + 201 * SEC, Record("devices/dev-3/t", b"new device"))])
    bodies = stream(own_reader, {})
    assert payloads(bodies)[-1] == b"late"
    assert len(bodies) == 6
    assert payloads(stream(own_reader, {}, topic=f"{PREFIX}/dev-3")) == [b"new device"]


@pytest.mark.parametrize("until", [None, BASE_NS + 10_000 * SEC])
def test_a_restore_without_until_ends_at_what_was_stored_when_it_began(
    own_store: Store, own_reader: LiveReader, monkeypatch: pytest.MonkeyPatch, until: int | None
) -> None:
    # An `until` later than anything stored ("until tomorrow") read on just the same.
    # Read to whatever was last, the restore of a device sending faster than it was read never
    # ended: here a new message of dev-1 arrives with every chunk read (up to 300 of them).
    monkeypatch.setattr(restore_module, "FIRST_CHUNK", 2)
    monkeypatch.setattr(restore_module, "CHUNK", 2)
    real, arrived = own_reader.read_rows, [0]

    def read_while_dev1_sends(cursor: Cursor, limit: int) -> list[tuple[bytes, bytes]]:
        rows = real(cursor, limit)
        if arrived[0] < 300:
            arrived[0] += 1
            late = Record("devices/dev-1/late", b"%d" % arrived[0])
            write(own_store, "dev-1", [(BASE_NS + (200 + arrived[0]) * SEC, late)])
        return rows

    monkeypatch.setattr(own_reader, "read_rows", read_while_dev1_sends)
    window = {} if until is None else {"until": until / SEC}
    assert [b["topic"] for b in stream(own_reader, window)] == [r.topic for r in DEV1]
    assert 1 < arrived[0] < 300  # messages did arrive during the restore
    last_arrived = b"%d" % arrived[0]
    newest_first = stream(own_reader, {"order": "desc", "limit": 1})
    assert payloads(newest_first) == [last_arrived]  # ...and were stored


def _slow_scan_of_dev1(reader: LiveReader, monkeypatch: pytest.MonkeyPatch, rounds: int) -> None:
    """Fault injection: dev-1's history reads as `rounds` copies of itself, each record slow.

    The records still come from the real store, chunk by chunk as the service asks for them (in
    its worker threads), so the service sees a long, slow scan exactly where RocksDB would be slow.
    """
    real = reader.read_rows

    def read(cursor: Cursor, limit: int) -> list[tuple[bytes, bytes]]:
        if cursor.device != "dev-1":
            return real(cursor, limit)
        whole = Cursor(cursor.device, cursor.since_ns, cursor.until_ns, cursor.reverse)
        copies = real(whole, 1 << 20) * rounds
        at = int.from_bytes(cursor.after or b"")  # this fake's cursor: a position
        chunk = copies[at : at + limit]
        for _ in chunk:
            time.sleep(0.0001)  # a slow disk: blocking, as a RocksDB read is
        cursor.after = (at + len(chunk)).to_bytes(4)
        cursor.done = at + len(chunk) >= len(copies)
        return chunk

    monkeypatch.setattr(reader, "read_rows", read)


def test_a_long_scan_does_not_hold_up_another_restore(
    reader: LiveReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A filter that matches nothing in a long history used to scan without ever yielding.
    _slow_scan_of_dev1(reader, monkeypatch, rounds=400)  # 2,000 records scanned
    terminals: list[str] = []

    class Conn(FakeConn):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        async def publish(self, topic: str, payload: bytes, *args: Any, **kw: Any) -> None:
            if b'"done"' in payload or b'"error"' in payload:
                terminals.append(self.name)
            await super().publish(topic, payload, *args, **kw)

    async def run() -> None:
        service = RestoreService(reader, GapLog(reader.data_dir))
        slow = Delivery(REQUEST, b'{"topic": "nothing/#"}', qos=1)
        fast = Delivery(f"{PREFIX}/dev-2", b"", qos=1)
        service.submit(slow, Conn("slow"))
        service.submit(fast, Conn("fast"))
        while len(terminals) < 2:
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert terminals == ["fast", "slow"]


def test_scans_that_find_nothing_keep_no_other_restore_waiting(
    reader: LiveReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    # More such scans than restores may run at once used to take every slot: an unrelated
    # restore waited for whole scans to end (issue 8, item 10).
    _slow_scan_of_dev1(reader, monkeypatch, rounds=200)  # 1,000 records scanned each
    terminals: list[str] = []

    class Conn(FakeConn):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        async def publish(self, topic: str, payload: bytes, *args: Any, **kw: Any) -> None:
            if b'"done"' in payload or b'"error"' in payload:
                terminals.append(self.name)
            await super().publish(topic, payload, *args, **kw)

    async def run() -> None:
        service = RestoreService(reader, GapLog(reader.data_dir), max_active=2)
        for _ in range(6):
            service.submit(Delivery(REQUEST, b'{"topic": "nothing/#"}', qos=1), Conn("slow"))
        await asyncio.sleep(0)  # the scans are under way
        service.submit(Delivery(f"{PREFIX}/dev-2", b"", qos=1), Conn("fast"))
        while len(terminals) < 7:
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert terminals[0] == "fast", terminals


def test_a_limit_ends_the_scan_at_the_last_message_sent(
    reader: LiveReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    _slow_scan_of_dev1(reader, monkeypatch, rounds=100)  # 500 records: several chunks
    chunks: list[int] = []
    real = reader.read_rows

    def counting(cursor: Cursor, limit: int) -> list[tuple[bytes, bytes]]:
        found = real(cursor, limit)
        chunks.append(len(found))
        return found

    monkeypatch.setattr(reader, "read_rows", counting)
    bodies = stream(reader, {"topic": "devices/dev-1/telemetry", "limit": 2})
    assert [b["topic"] for b in bodies] == ["devices/dev-1/telemetry"] * 2
    assert chunks == [FIRST_CHUNK]  # the first chunk held both: no further chunk was read


def test_the_next_chunk_is_read_while_this_one_is_sent(
    reader: LiveReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading each chunk only after the last was queued, the window ran dry at chunk ends.
    _slow_scan_of_dev1(reader, monkeypatch, rounds=300)  # 1,500 records: four chunks
    conn = FakeConn(delay=0.002)  # a PUBACK round trip
    sent_at_read: list[int] = []
    real = reader.read_rows

    def counting(cursor: Cursor, limit: int) -> list[tuple[bytes, bytes]]:
        sent_at_read.append(len(conn.sent))
        return real(cursor, limit)

    monkeypatch.setattr(reader, "read_rows", counting)
    assert len(stream(reader, {}, conn=conn)) == 1500
    assert len(sent_at_read) == 4
    # The third chunk was asked for as the second came, not once the second was queued.
    assert sent_at_read[2] < FIRST_CHUNK + CHUNK // 2, sent_at_read


def test_a_restore_waiting_for_its_slot_reads_one_chunk(
    reader: LiveReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading ahead starts once a restore sends: 64 waiting restores hold a chunk each, not two.
    _slow_scan_of_dev1(reader, monkeypatch, rounds=300)
    reads: list[str] = []
    real = reader.read_rows

    def counting(cursor: Cursor, limit: int) -> list[tuple[bytes, bytes]]:
        reads.append(cursor.device)
        return real(cursor, limit)

    monkeypatch.setattr(reader, "read_rows", counting)
    ended: list[int] = []

    class Conn(FakeConn):
        async def publish(self, topic: str, payload: bytes, *args: Any, **kw: Any) -> None:
            if b'"done"' in payload:
                ended.append(len(reads))
            await super().publish(topic, payload, *args, **kw)

    async def run() -> None:
        service = RestoreService(reader, GapLog(reader.data_dir), max_active=1)
        service.submit(Delivery(f"{PREFIX}/dev-2", b"", qos=1), Conn(delay=0.2))  # 3 records
        service.submit(Delivery(REQUEST, b"", qos=1), Conn())  # dev-1: 1,500 records
        while len(ended) < 2:
            await asyncio.sleep(0.01)

    asyncio.run(run())
    # dev-2's restore held the slot to its end: dev-1's read its first chunk, then waited.
    assert reads[: ended[0]].count("dev-1") == 1, reads


def test_a_limit_bounds_the_chunk_read(reader: LiveReader, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without a topic filter every record read is sent: `limit 1` reads one, not a chunk.
    asked: list[int] = []
    real = reader.read_rows

    def counting(cursor: Cursor, limit: int) -> list[tuple[bytes, bytes]]:
        asked.append(limit)
        return real(cursor, limit)

    monkeypatch.setattr(reader, "read_rows", counting)
    assert payloads(stream(reader, {"limit": 1})) == [DEV1[0].payload]
    assert asked == [1]


def test_a_restore_of_big_values_reads_byte_bounded_chunks_and_sends_all(
    own_store: Store, own_reader: LiveReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = [Record("devices/dev-5/t", bytes([i]) * (CHUNK_BYTES // 3)) for i in range(10)]
    write(own_store, "dev-5", [(BASE_NS + i, r) for i, r in enumerate(big)])
    chunks: list[int] = []
    real = own_reader.read_rows

    def counting(cursor: Cursor, limit: int) -> list[tuple[bytes, bytes]]:
        found = real(cursor, limit)
        chunks.append(sum(len(decode_fields(value)[4]) for _, value in found))  # payloads
        return found

    monkeypatch.setattr(own_reader, "read_rows", counting)
    bodies = stream(own_reader, {}, topic=f"{PREFIX}/dev-5")
    assert payloads(bodies) == [r.payload for r in big]
    assert len(chunks) > 1
    assert max(chunks) < CHUNK_BYTES + CHUNK_BYTES // 3  # the budget, overshot by one value


def test_window_bounds_publishes_in_flight(own_store: Store, own_reader: LiveReader) -> None:
    write(
        own_store, "dev-4", [(BASE_NS + i, Record("devices/dev-4/t", b"%d" % i)) for i in range(30)]
    )
    conn = FakeConn(delay=0.002)
    sent = ask(own_reader, b"", topic=f"{PREFIX}/dev-4", conn=conn, window=3)
    messages, done = split(sent)
    assert done["count"] == 30
    assert payloads([m.body() for m in messages]) == [b"%d" % i for i in range(30)]
    assert conn.peak == 3
    assert conn.in_flight_at_terminal == [0]  # the terminal goes out after every PUBACK


def test_a_failed_publish_ends_the_stream_with_an_error(reader: LiveReader) -> None:
    class Failing(FakeConn):
        async def publish(
            self,
            topic: str,
            payload: bytes,
            qos: int = 1,
            retain: bool = False,
            props: Properties | None = None,
        ) -> None:
            await super().publish(topic, payload, qos, retain, props)
            if len(self.sent) == 2:
                raise BrokerUnreachable("publish failed: gone")

    conn = Failing()
    sent = ask(reader, b"", conn=conn, window=1)
    messages, body = split(sent)
    assert "gone" in body["error"]
    assert [m.body()["seq"] for m in messages] == [1, 2]  # nothing after the failure
    assert not any(m.terminal == "done" for m in sent)


def test_a_dead_connection_does_not_raise(reader: LiveReader) -> None:
    class Dead(FakeConn):
        async def publish(
            self,
            topic: str,
            payload: bytes,
            qos: int = 1,
            retain: bool = False,
            props: Properties | None = None,
        ) -> None:
            await super().publish(topic, payload, qos, retain, props)
            raise BrokerUnreachable("not connected")

    sent = ask(reader, b"", conn=Dead())  # nothing raised: the terminal failure is logged
    assert sent
    assert sent[-1].terminal == "error"


@pytest.mark.parametrize("payload", [b'{"id": "\\ud800"}', b'{"id": "\\udfff", "limt": 1}'])
def test_id_that_is_not_unicode_still_gets_one_terminal(reader: LiveReader, payload: bytes) -> None:
    # A lone surrogate ("\ud800") is valid JSON but cannot be encoded to UTF-8: the id check
    # refuses it, so the one terminal (an error) can be sent; once nothing at all was published.
    sent = ask(reader, payload)
    assert "'id'" in only_error(sent)


def test_corrupt_gap_log_ends_the_stream_with_an_error(own_reader: LiveReader) -> None:
    GapLog(own_reader.data_dir).path.write_text("garbage\n", encoding="utf-8")
    messages, body = split(ask(own_reader))
    assert len(messages) == 5
    assert "gaps.jsonl" in body["error"]


@pytest.mark.parametrize("request_body", [b"", b'{"format": "raw"}', b'{"mode": "replay"}'])
def test_a_corrupt_record_ends_the_stream_with_an_error_after_what_came_before(
    own_store: Store, own_reader: LiveReader, request_body: bytes
) -> None:
    # Restores decode stored bytes themselves (no Record per message): the checksum is still
    # checked, and a damaged record is reported, never sent or skipped.
    name, dev_key = own_store.locate("dev-1")
    part = own_store.partitions[name]
    rows = part.read_range(dev_key, None, None, False, None, 99)
    key, value = rows[3]
    part._db[key] = value[:-1] + bytes([value[-1] ^ 1])  # one bit of the payload flipped
    messages, body = split(ask(own_reader, request_body))
    assert len(messages) <= 3  # never the damaged one, nor any after it
    assert body["error"] == "corrupt record: checksum mismatch", body


# ---- 4. window and pacer ------------------------------------------------------------------------


def test_window_holds_at_most_n_in_flight() -> None:
    async def run() -> tuple[int, int, int]:
        window = Window(3)
        gate = asyncio.Event()
        active = peak = started = 0

        async def publish() -> None:
            nonlocal active, peak, started
            started += 1
            active += 1
            peak = max(peak, active)
            await gate.wait()
            active -= 1

        async def produce() -> None:
            for _ in range(10):
                await window.send(publish())
            await window.drain()

        task = asyncio.create_task(produce())
        for _ in range(20):
            await asyncio.sleep(0)
        held = started
        assert not task.done()
        gate.set()
        await task
        return held, peak, started

    held, peak, started = asyncio.run(run())
    assert (held, peak, started) == (3, 3, 10)


def test_window_drain_waits_for_every_publish() -> None:
    async def run() -> list[int]:
        window = Window(4)
        finished: list[int] = []

        async def publish(n: int) -> None:
            await asyncio.sleep(0.001 * (10 - n))
            finished.append(n)

        for n in range(10):
            await window.send(publish(n))
        await window.drain()
        return finished

    assert sorted(asyncio.run(run())) == list(range(10))


def test_window_first_failure_reraises_from_send_and_drain() -> None:
    async def run() -> None:
        window = Window(4)

        async def fail(text: str) -> None:
            raise RuntimeError(text)

        async def fine() -> None:
            await asyncio.sleep(0)

        await window.send(fail("first"))
        await window.send(fail("second"))
        await window.send(fine())
        await asyncio.sleep(0.01)
        late = fine()
        with pytest.raises(RuntimeError, match="first"):
            await window.send(late)
        assert inspect.getcoroutinestate(late) == inspect.CORO_CLOSED  # never started, no warning
        with pytest.raises(RuntimeError, match="first"):
            await window.drain()

    asyncio.run(run())


def test_window_failure_while_draining() -> None:
    async def run() -> None:
        window = Window(2)

        async def fail() -> None:
            await asyncio.sleep(0.001)
            raise BrokerUnreachable("lost")

        await window.send(fail())
        with pytest.raises(BrokerUnreachable, match="lost"):
            await window.drain()

    asyncio.run(run())


def test_window_cancel_abandons_what_is_in_flight() -> None:
    cancelled: list[int] = []

    async def run() -> None:
        window = Window(2)
        event = asyncio.Event()

        async def hang(n: int) -> None:
            try:
                await event.wait()
            except asyncio.CancelledError:
                cancelled.append(n)
                raise

        await window.send(hang(1))
        await window.send(hang(2))
        await asyncio.sleep(0)  # both publishes start: in flight, waiting for their PUBACK
        window.cancel()
        await window.drain()  # cancelled publishes are not failures: nothing raised
        assert sorted(cancelled) == [1, 2]
        await window.send(hang(3))  # their slots are free again: no wait here
        await asyncio.sleep(0)
        window.cancel()
        await window.drain()

    asyncio.run(asyncio.wait_for(run(), 5))
    assert sorted(cancelled) == [1, 2, 3]


def test_a_publish_waiting_for_a_slot_is_closed_when_the_restore_is_cancelled() -> None:
    # Abandoned restores (connection lost) are cancelled here; the waiting publish coroutine must
    # be closed, or Python warns that it "was never awaited".
    started: list[int] = []

    async def publish(n: int) -> None:
        started.append(n)
        await asyncio.Event().wait()

    async def run() -> None:
        window = Window(1)
        await window.send(publish(1))
        waiting = publish(2)
        sender = asyncio.create_task(window.send(waiting))
        await asyncio.sleep(0)
        sender.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sender
        assert inspect.getcoroutinestate(waiting) == inspect.CORO_CLOSED
        window.cancel()
        await window.drain()

    asyncio.run(asyncio.wait_for(run(), 5))
    assert started == [1]


def test_pacer_holds_the_rate() -> None:
    clock = FakeClock()

    async def run() -> None:
        pacer = Pacer(200, clock, clock.sleep)
        for _ in range(20):
            await pacer.wait()

    asyncio.run(run())
    assert clock.sleeps == pytest.approx([0.005] * 19)
    assert clock.now == pytest.approx(19 / 200)


def test_pacer_catches_up_after_a_late_message() -> None:
    clock = FakeClock()

    async def run() -> None:
        pacer = Pacer(10, clock, clock.sleep)
        await pacer.wait()  # message 0, due now
        clock.now += 0.35  # the publish of message 0 was slow
        for _ in range(4):  # messages 1-3 are overdue, message 4 is due at 0.4
            await pacer.wait()

    asyncio.run(run())
    assert clock.sleeps == pytest.approx([0.05])


def test_pacer_without_rate_does_not_wait() -> None:
    clock = FakeClock()

    async def run() -> None:
        pacer = Pacer(None, clock, clock.sleep)
        for _ in range(1000):
            await pacer.wait()

    asyncio.run(run())
    assert clock.sleeps == []


# ---- 5. DroppedWatcher --------------------------------------------------------------------------


def test_dropped_watcher(tmp_path: Path) -> None:
    log = GapLog(tmp_path)
    watcher = DroppedWatcher(log)
    assert watcher.observe(b"10", now_ns=1_000) is None  # baseline
    assert log.all() == []
    gap = watcher.observe(b"15", now_ns=2_000)
    assert gap == Gap(1_000, 2_000, "broker-dropped")
    assert log.all() == [gap]
    assert watcher.observe(b"15", now_ns=3_000) is None  # no change
    # The broker restarted (the counter went back) and has dropped 3 since: a gap.
    assert watcher.observe(b"3", now_ns=4_000) == Gap(3_000, 4_000, "broker-dropped")
    assert watcher.observe(b"5\n", now_ns=5_000) == Gap(4_000, 5_000, "broker-dropped")
    assert len(log.all()) == 3
    # Restarted again, at 0, while the bridge ran: a new baseline.
    assert watcher.observe(b"0", now_ns=6_000) is None
    assert len(log.all()) == 3


def test_dropped_watcher_counts_in_words(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    watcher = DroppedWatcher(GapLog(tmp_path))
    watcher.observe(b"10", now_ns=1_000)
    with caplog.at_level(logging.WARNING):
        watcher.observe(b"11", now_ns=2_000)  # one more
        watcher.observe(b"1", now_ns=3_000)  # restarted, one since
    texts = [r.getMessage() for r in caplog.records]
    assert any("the broker dropped 1 message since" in t for t in texts), texts
    assert any("has dropped 1 message since" in t for t in texts), texts


BROKER = "127.0.0.1:1883"


def _uptime(seconds: int) -> bytes:
    return f"{seconds} seconds".encode()


def test_a_rise_while_the_bridge_was_away_is_a_gap_over_the_downtime(tmp_path: Path) -> None:
    log = GapLog(tmp_path)
    first = DroppedWatcher(log, tmp_path, BROKER)
    first.observe_uptime(_uptime(1000), now_ns=100 * SEC)
    first.observe(b"0", now_ns=100 * SEC)
    first.save()  # the bridge stops at 105 s (its last confirmed reading: 100 s)
    again = DroppedWatcher(log, tmp_path, BROKER)  # restarted at 900 s; the broker dropped 400
    again.observe_uptime(_uptime(1800), now_ns=900 * SEC)
    gap = again.observe(b"400", now_ns=900 * SEC)
    assert gap == Gap(100 * SEC, 900 * SEC, "broker-dropped")
    assert log.all() == [gap]


def test_no_rise_while_away_is_no_gap(tmp_path: Path) -> None:
    log = GapLog(tmp_path)
    DroppedWatcher(log, tmp_path, BROKER).observe(b"7", now_ns=100 * SEC)
    assert DroppedWatcher(log, tmp_path, BROKER).observe(b"7", now_ns=900 * SEC) is None
    assert log.all() == []


def test_uptime_readings_confirm_the_value_so_the_span_starts_later(tmp_path: Path) -> None:
    log = GapLog(tmp_path)
    first = DroppedWatcher(log, tmp_path, BROKER)
    first.observe(b"0", now_ns=100 * SEC)
    for t in (110, 120, 130):  # the broker's $SYS interval: 10 s
        first.observe_uptime(_uptime(t), now_ns=t * SEC)
    first.save()
    # An uptime reading confirms the counter as of the one before it (counters come after it).
    gap = DroppedWatcher(log, tmp_path, BROKER).observe(b"3", now_ns=500 * SEC)
    assert gap == Gap(120 * SEC, 500 * SEC, "broker-dropped")


def test_a_stale_first_reading_does_not_move_the_span_start(tmp_path: Path) -> None:
    # Restarted at 900 s, the retained value still says 0; the broker's next publication (with
    # what it dropped during the downtime) comes an interval later: the gap covers the downtime.
    log = GapLog(tmp_path)
    DroppedWatcher(log, tmp_path, BROKER).observe(b"0", now_ns=100 * SEC)
    again = DroppedWatcher(log, tmp_path, BROKER)
    again.observe_uptime(_uptime(5000), now_ns=900 * SEC)  # retained: confirms nothing
    assert again.observe(b"0", now_ns=900 * SEC) is None
    again.observe_uptime(_uptime(5010), now_ns=910 * SEC)
    assert again.observe(b"300", now_ns=910 * SEC) == Gap(100 * SEC, 910 * SEC, "broker-dropped")


def test_a_reading_of_another_broker_is_no_baseline(tmp_path: Path) -> None:
    log = GapLog(tmp_path)
    DroppedWatcher(log, tmp_path, BROKER).observe(b"0", now_ns=100 * SEC)
    assert DroppedWatcher(log, tmp_path, "other:1883").observe(b"50", now_ns=900 * SEC) is None
    assert log.all() == []


def test_a_broker_restart_while_away_makes_the_downtime_a_gap(tmp_path: Path) -> None:
    # Its counter restarted at 0: what it dropped before its restart cannot be seen.
    log = GapLog(tmp_path)
    first = DroppedWatcher(log, tmp_path, BROKER)
    first.observe_uptime(_uptime(5000), now_ns=100 * SEC)  # broker up since -4900 s
    first.observe(b"0", now_ns=100 * SEC)
    again = DroppedWatcher(log, tmp_path, BROKER)
    again.observe_uptime(_uptime(300), now_ns=900 * SEC)  # broker up since 600 s: restarted
    # Its counter covers everything since its start: the gap ends there, not now.
    assert again.observe(b"0", now_ns=900 * SEC) == Gap(100 * SEC, 600 * SEC, "broker-dropped")


def test_a_lower_value_while_away_is_a_restart_and_a_gap(tmp_path: Path) -> None:
    log = GapLog(tmp_path)
    DroppedWatcher(log, tmp_path, BROKER).observe(b"9", now_ns=100 * SEC)
    gap = DroppedWatcher(log, tmp_path, BROKER).observe(b"0", now_ns=900 * SEC)
    assert gap == Gap(100 * SEC, 900 * SEC, "broker-dropped")


def test_a_broker_restart_at_zero_while_running_is_a_new_baseline(tmp_path: Path) -> None:
    log = GapLog(tmp_path)
    watcher = DroppedWatcher(log, tmp_path, BROKER)
    watcher.observe_uptime(_uptime(5000), now_ns=100 * SEC)
    watcher.observe(b"0", now_ns=100 * SEC)
    watcher.connected()  # the broker went away and came back
    watcher.observe_uptime(_uptime(3), now_ns=200 * SEC)
    assert watcher.observe(b"0", now_ns=200 * SEC) is None
    # That first reading was the retained one: the next rise's span starts where the old one held.
    assert watcher.observe(b"2", now_ns=210 * SEC) == Gap(100 * SEC, 210 * SEC, "broker-dropped")


def test_a_stale_uptime_is_no_restart(tmp_path: Path) -> None:
    # Retained $SYS values are up to one interval old: the start estimate wobbles by that much.
    log = GapLog(tmp_path)
    first = DroppedWatcher(log, tmp_path, BROKER)
    first.observe_uptime(_uptime(5000), now_ns=100 * SEC)
    first.observe(b"0", now_ns=100 * SEC)
    again = DroppedWatcher(log, tmp_path, BROKER)
    again.observe_uptime(_uptime(5780), now_ns=900 * SEC)  # 20 s "late": a stale reading
    assert again.observe(b"0", now_ns=900 * SEC) is None


def test_the_reading_is_saved_privately_and_atomically(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        DroppedWatcher(GapLog(tmp_path), tmp_path, BROKER).observe(b"4", now_ns=100 * SEC)
    finally:
        os.umask(old_umask)
    saved = tmp_path / "broker-dropped.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text()) == {
        "broker": BROKER,
        "dropped": 4,
        "seen_ns": 100 * SEC,
        "broker_started_ns": None,
    }
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("content", ["", "{", "[]", '{"broker": "x"}', '{"dropped": "a"}'])
def test_an_unreadable_saved_reading_is_a_fresh_baseline(tmp_path: Path, content: str) -> None:
    (tmp_path / "broker-dropped.json").write_text(content)
    watcher = DroppedWatcher(GapLog(tmp_path), tmp_path, BROKER)
    assert watcher.observe(b"10", now_ns=100 * SEC) is None
    assert watcher.observe(b"11", now_ns=200 * SEC) is not None


def test_drops_are_unknown_until_sys_arrives_on_this_connection(tmp_path: Path) -> None:
    watcher = DroppedWatcher(GapLog(tmp_path), tmp_path, BROKER)
    unknown = [watcher.unknown(None, None)]
    watcher.observe(b"garbage", now_ns=SEC)
    unknown.append(watcher.unknown(None, None))
    watcher.observe_uptime(_uptime(5), now_ns=SEC)  # $SYS is readable here
    unknown.append(watcher.unknown(None, None))
    watcher.connected()
    unknown.append(watcher.unknown(None, None))
    watcher.observe(b"0", now_ns=2 * SEC)
    unknown.append(watcher.unknown(None, None))
    assert unknown == [True, True, False, True, False]


def test_a_live_reading_is_a_change_even_without_a_baseline(tmp_path: Path) -> None:
    # A fresh bridge on a broker whose counter has not changed for a minute: no retained value.
    log = GapLog(tmp_path)
    watcher = DroppedWatcher(log, tmp_path, BROKER)
    watcher.connected(now_ns=100 * SEC)
    watcher.observe_uptime(_uptime(5000), now_ns=100 * SEC)
    watcher.observe_uptime(_uptime(5010), now_ns=110 * SEC)  # no retained counter came
    assert watcher.unknown(None, None) is False  # nothing to cover before a first start
    gap = watcher.observe(b"7", retained=False, now_ns=300 * SEC)
    assert gap == Gap(100 * SEC, 300 * SEC, "broker-dropped")
    assert log.all() == [gap]


def test_no_retained_value_after_a_short_absence_keeps_the_saved_value(tmp_path: Path) -> None:
    log = GapLog(tmp_path)
    DroppedWatcher(log, tmp_path, BROKER).observe(b"5", now_ns=100 * SEC)
    again = DroppedWatcher(log, tmp_path, BROKER)
    again.connected(now_ns=130 * SEC)  # 30 s away: a change would still be retained
    again.observe_uptime(_uptime(5000), now_ns=130 * SEC)
    again.observe_uptime(_uptime(5010), now_ns=140 * SEC)
    assert again.unknown(None, None) is False
    assert again.observe(b"5", retained=False, now_ns=150 * SEC) is None
    assert again.observe(b"6", retained=False, now_ns=160 * SEC) is not None


def test_no_retained_value_after_a_long_absence_makes_the_downtime_unknown(
    tmp_path: Path,
) -> None:
    # Mosquitto's $SYS values expire after 60 s: a rise early in a long downtime is not retained
    # when the bridge comes back. Drops over the downtime are unknown, not complete.
    log = GapLog(tmp_path)
    DroppedWatcher(log, tmp_path, BROKER).observe(b"0", now_ns=100 * SEC)
    again = DroppedWatcher(log, tmp_path, BROKER)
    again.connected(now_ns=900 * SEC)
    again.observe_uptime(_uptime(5000), now_ns=900 * SEC)
    assert again.unknown(None, None) is False  # not decided before an interval passed
    again.observe_uptime(_uptime(5010), now_ns=910 * SEC)
    assert again.unknown(None, None) is True
    assert again.unknown(50 * SEC, 150 * SEC) is True
    assert again.unknown(950 * SEC, None) is False  # watched live since the reconnect
    assert again.unknown(None, 100 * SEC) is False
    assert log.all() == []  # unknown is not a gap: complete stays about what is seen
    # A later change tells the value moved, but no longer how much before the reconnect.
    gap = again.observe(b"400", retained=False, now_ns=1000 * SEC)
    assert gap == Gap(900 * SEC, 1000 * SEC, "broker-dropped")
    # The next start still knows about the unknown span.
    assert DroppedWatcher(log, tmp_path, BROKER).unknown(50 * SEC, 150 * SEC) is True


def test_done_says_broker_drops_unknown_without_a_reading(own_reader: LiveReader) -> None:
    watcher = DroppedWatcher(GapLog(own_reader.data_dir), own_reader.data_dir, BROKER)
    done = split(ask(own_reader, dropped=watcher))[1]
    assert done == {
        "done": True,
        "protocol": 1,
        "device": "dev-1",
        "count": 5,
        "complete": True,
        "broker_drops": "unknown",
    }
    watcher.observe(b"0")
    done = split(ask(own_reader, dropped=watcher))[1]
    assert "broker_drops" not in done
    assert done["complete"] is True


def test_done_says_broker_drops_unknown_over_an_unknown_span(own_reader: LiveReader) -> None:
    data = own_reader.data_dir
    DroppedWatcher(GapLog(data), data, BROKER).observe(b"0", now_ns=T[0] - 1000 * SEC)
    watcher = DroppedWatcher(GapLog(data), data, BROKER)
    watcher.connected(now_ns=T[2])  # away from long before T[0] until T[2]
    watcher.observe_uptime(_uptime(9000), now_ns=T[2])
    watcher.observe_uptime(_uptime(9010), now_ns=T[2] + 10 * SEC)
    inside = split(ask(own_reader, dropped=watcher))[1]
    assert (inside["complete"], inside["broker_drops"]) == (True, "unknown")
    after = json.dumps({"since": format_ts(T[3])}).encode()
    assert "broker_drops" not in split(ask(own_reader, after, dropped=watcher))[1]


def test_dropped_watcher_span_starts_at_the_previous_reading(tmp_path: Path) -> None:
    watcher = DroppedWatcher(GapLog(tmp_path))
    watcher.observe(b"0", now_ns=1_000)
    watcher.observe(b"0", now_ns=2_000)
    watcher.observe(b"0", now_ns=3_000)
    assert watcher.observe(b"1", now_ns=4_000) == Gap(3_000, 4_000, "broker-dropped")


@pytest.mark.parametrize("garbage", [b"", b"abc", b"1.5", b"\xff\xfe", b"12 13", "١٢".encode()])
def test_dropped_watcher_ignores_garbage(tmp_path: Path, garbage: bytes) -> None:
    log = GapLog(tmp_path)
    watcher = DroppedWatcher(log)
    assert watcher.observe(garbage, now_ns=500) is None  # no baseline from garbage
    assert watcher.observe(b"7", now_ns=1_000) is None
    assert watcher.observe(garbage, now_ns=1_500) is None
    assert watcher.observe(b"9", now_ns=2_000) == Gap(1_000, 2_000, "broker-dropped")
    assert log.all() == [Gap(1_000, 2_000, "broker-dropped")]


def test_dropped_watcher_uses_the_clock(tmp_path: Path) -> None:
    watcher = DroppedWatcher(GapLog(tmp_path))
    before = time.time_ns()
    watcher.observe(b"1")
    gap = watcher.observe(b"2")
    after = time.time_ns()
    assert gap is not None
    assert before <= gap.since_ns <= gap.until_ns <= after


def test_dropped_gap_shows_in_a_restore(own_reader: LiveReader) -> None:
    watcher = DroppedWatcher(GapLog(own_reader.data_dir))
    watcher.observe(b"100", now_ns=T[1])
    watcher.observe(b"101", now_ns=T[2])
    done = split(ask(own_reader))[1]
    assert done["gaps"] == [
        {"since": format_ts(T[1]), "until": format_ts(T[2]), "reason": "broker-dropped"}
    ]


# ---- 6. topics.check_device -------------------------------------------------------------------


@pytest.mark.parametrize("device", ["dev-1", "Gerät-温度", "a b", "$dev", "x" * 200])
def test_check_device_ok(device: str) -> None:
    assert check_device(device) == device  # raises UsageError on a bad id
    # What it accepts is one topic level: the service's subscription hears the request.
    assert filter_matches(f"{PREFIX}/+", f"{PREFIX}/{device}")


@pytest.mark.parametrize("device", ["", "a/b", "/", "+", "#", "dev+", "dev#1", "a/"])
def test_check_device_refuses(device: str) -> None:
    with pytest.raises(UsageError) as caught:
        check_device(device)
    assert repr(device) in caught.value.message()
