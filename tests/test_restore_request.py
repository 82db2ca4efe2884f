"""The restore protocol pinned by properties (shared/DESIGN.md section 4).

The client writes a `Request` with `payload()`; the bridge reads it with `parse_request`: every
request survives that trip unchanged, and what the design calls invalid is refused with a reason
(and the request's id, when it could be read).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtt_backup.errors import UsageError
from mqtt_backup.restore.client import request_for
from mqtt_backup.restore.request import (
    FIELDS,
    MAX_ID_CHARS,
    MAX_REQUEST_BYTES,
    MIN_RATE,
    BadRequest,
    Request,
    parse_request,
)
from mqtt_backup.times import MAX_NS, format_ts

# Text an MQTT message can carry: no lone surrogates.
_TEXT = st.characters(exclude_categories=["Cs"])
_LEVEL = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/+#"))
devices = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/+#"), min_size=1)
times = st.integers(0, MAX_NS)


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    """Valid filters: levels, `+` as whole levels, `#` only as the whole last level."""
    levels = draw(st.lists(st.one_of(_LEVEL, st.just("+")), min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    topic = "/".join(levels)
    return topic or "#"


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """Any request the design allows."""
    since, until = draw(st.one_of(st.none(), times)), draw(st.one_of(st.none(), times))
    if since is not None and until is not None and since > until:
        since, until = until, since
    return Request(
        device=draw(devices),
        since_ns=since,
        until_ns=until,
        topic=draw(st.one_of(st.none(), topic_filters())),
        limit=draw(st.one_of(st.none(), st.integers(1, 2**63))),
        descending=draw(st.booleans()),
        replay=draw(st.booleans()),
        raw=draw(st.booleans()),
        request_id=draw(st.one_of(st.none(), st.text(_TEXT, max_size=MAX_ID_CHARS))),
        rate=draw(
            st.one_of(st.none(), st.floats(MIN_RATE, 1e12, allow_nan=False, allow_infinity=False))
        ),
        retain=draw(st.booleans()),
    )


@given(requests())
def test_a_request_survives_the_wire(request: Request) -> None:
    assert parse_request(request.device, request.payload()) == request


@given(requests())
def test_the_client_builds_the_request_the_bridge_reads(request: Request) -> None:
    assert request_for(request.device, request.fields()) == request


def test_an_empty_payload_asks_for_everything() -> None:
    assert Request("dev-1").payload() == b""
    assert parse_request("dev-1", b"") == Request("dev-1")
    assert parse_request("dev-1", b" \n") == Request("dev-1")


# Each: a field and values the design refuses for it.
_INVALID: dict[str, list[Any]] = {
    "since": ["yesterday", True, [], {}, -1, math.nan],
    "until": ["tomorrow", False, [1]],
    "topic": ["a/#/b", "a+", "", 5],
    "limit": [0, -1, 1.5, True, "5", 1e400],
    "order": ["sideways", "ASC", 1],
    "mode": ["restore", True],
    "format": ["xml", "csv"],
    "rate": [0, -1, math.inf, MIN_RATE / 2, "fast", True],
    "retain": ["yes", 1],
    "id": [5, ["x"], "x" * (MAX_ID_CHARS + 1)],
}
_BAD = st.sampled_from([(name, value) for name, values in _INVALID.items() for value in values])


def _wire(fields: dict[str, Any]) -> bytes:
    # allow_nan: NaN and Infinity must reach the parser, which refuses them.
    return json.dumps(fields, allow_nan=True).encode("utf-8")


@given(requests(), _BAD)
def test_a_bad_value_is_refused_with_the_id(request: Request, bad: tuple[str, Any]) -> None:
    name, value = bad
    fields = {**request.fields(), name: value}
    with pytest.raises(BadRequest) as refused:
        parse_request(request.device, _wire(fields))
    assert refused.value.reason
    # The id is echoed when it could be read, so the client is not left waiting.
    assert refused.value.request_id == (request.request_id if name != "id" else None)


@given(requests(), st.text(_TEXT, min_size=1).filter(lambda k: k not in FIELDS))
def test_an_unknown_field_is_named(request: Request, unknown: str) -> None:
    fields = {**request.fields(), unknown: 1}
    with pytest.raises(BadRequest, match="unknown field") as refused:
        parse_request(request.device, _wire(fields))
    assert repr(unknown) in refused.value.reason


@given(requests(), times, st.integers(1, 10**12))
def test_since_after_until_is_refused(request: Request, until: int, later: int) -> None:
    since = min(until + later, MAX_NS)
    fields = {**request.fields(), "since": format_ts(since), "until": format_ts(until)}
    if since == until:
        assert parse_request(request.device, _wire(fields)).since_ns == until  # empty window
        return
    with pytest.raises(BadRequest, match="'since' is after 'until'"):
        parse_request(request.device, _wire(fields))


@pytest.mark.parametrize(
    "payload",
    [b"[1]", b'"x"', b"null", b"{", b"\xff", b'{"limit": 1, "limit": 2}', b"[" * 5000],
)
def test_what_is_no_json_object_is_refused(payload: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request("dev-1", payload)


def test_a_request_over_64_kib_is_refused() -> None:
    with pytest.raises(BadRequest, match="64 KiB"):
        parse_request("dev-1", b"{" + b" " * MAX_REQUEST_BYTES + b"}")


def test_the_client_refuses_before_sending() -> None:
    with pytest.raises(UsageError, match="'rate' must be at least"):
        request_for("dev-1", {"mode": "replay", "rate": MIN_RATE / 2})
    with pytest.raises(UsageError, match="one topic level"):
        request_for("a/b", {})
