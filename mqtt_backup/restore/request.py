"""A restore request (shared/DESIGN.md section 4): parsed strictly, written back exactly.

Pure: no I/O. The service parses what arrives (`parse_request`); the client builds the same
`Request` and sends `request.payload()`, so both sides speak through one type, and
`parse_request(r.device, r.payload()) == r` pins the protocol.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from mqtt_backup.errors import UsageError
from mqtt_backup.times import format_ts, parse_time
from mqtt_backup.topics import check_filter, check_member_name

# The version of the restore protocol beyond shared/DESIGN.md section 4, in every terminal and
# in the status message, so that a newer client can tell what an older bridge understands:
# absent (0) = before scale-out; 1 = answers carry `instance` in a group, requests may carry
# `group`, terminals carry `protocol`.
PROTOCOL = 1
MAX_REQUEST_BYTES = 64 * 1024
MAX_ID_CHARS = 1024
MIN_RATE = 0.01
FIELDS = (
    "since",
    "until",
    "topic",
    "limit",
    "order",
    "mode",
    "format",
    "id",
    "rate",
    "retain",
    "group",
)


class BadRequest(Exception):
    """A restore request that cannot be served; the message is the terminal's `error`."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed restore request (DESIGN.md section 4)."""

    device: str
    since_ns: int | None = None
    until_ns: int | None = None
    topic: str | None = None
    limit: int | None = None
    descending: bool = False
    replay: bool = False
    raw: bool = False
    request_id: str | None = None
    rate: float | None = None
    retain: bool = False
    group: str | None = None  # only the bridges of this group answer (DESIGN section 6)

    @classmethod
    def from_fields(cls, device: str, fields: dict[str, Any]) -> Request:
        """The request from already-decoded JSON fields; BadRequest says what is wrong."""
        request_id = _request_id(fields)
        try:
            return _build(device, fields, request_id)
        except BadRequest as exc:
            raise BadRequest(exc.reason, request_id) from None

    def fields(self) -> dict[str, Any]:
        """The JSON fields of this request; defaults are left out."""
        fields: dict[str, Any] = {}
        if self.since_ns is not None:
            fields["since"] = format_ts(self.since_ns)
        if self.until_ns is not None:
            fields["until"] = format_ts(self.until_ns)
        if self.topic is not None:
            fields["topic"] = self.topic
        if self.limit is not None:
            fields["limit"] = self.limit
        if self.descending:
            fields["order"] = "desc"
        if self.replay:
            fields["mode"] = "replay"
        if self.raw:
            fields["format"] = "raw"
        if self.request_id is not None:
            fields["id"] = self.request_id
        if self.rate is not None:
            fields["rate"] = self.rate
        if self.retain:
            fields["retain"] = True
        if self.group is not None:
            fields["group"] = self.group
        return fields

    def payload(self) -> bytes:
        """The request as it goes on the wire (empty when it asks for everything)."""
        fields = self.fields()
        return json.dumps(fields, ensure_ascii=False).encode("utf-8") if fields else b""


# ---- parsing ------------------------------------------------------------------------------------


def parse_request(device: str, payload: bytes) -> Request:
    """The request for `device` from its payload; BadRequest says what is wrong with it."""
    if not device:
        raise BadRequest("the request topic has no device: publish to <namespace>/restore/<device>")
    if len(payload) > MAX_REQUEST_BYTES:
        raise BadRequest(
            f"request is {len(payload)} bytes; at most 64 KiB ({MAX_REQUEST_BYTES}) allowed"
        )
    if not payload.strip():
        return Request(device)
    try:
        fields = _json_object(payload)
    except BadRequest as exc:
        raise BadRequest(exc.reason, _lenient_id(payload)) from None
    return Request.from_fields(device, fields)


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(
            payload.decode("utf-8"),
            parse_constant=_no_constants,
            object_pairs_hook=_no_duplicates,
        )
    except UnicodeDecodeError:
        raise BadRequest("request is not UTF-8 text") from None
    except RecursionError:
        raise BadRequest("request JSON is nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"request is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"request must be a JSON object, not {_json_type(value)}")
    return value


def _lenient_id(payload: bytes) -> str | None:
    """The id of a request the strict parser refused, when a lenient read still finds one.

    The error reply then carries it, so a client waiting for its id is not left to time out
    (e.g. `{"id": "x", "rate": Infinity}`). A duplicated or invalid id stays unknown.
    """

    def collect(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found = dict(pairs)
        if sum(1 for key, _ in pairs if key == "id") > 1:
            found.pop("id")  # which one the client waits for is anybody's guess
        return found

    try:
        value = json.loads(payload.decode("utf-8"), object_pairs_hook=collect)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(value, dict):
        return None
    try:
        return _request_id(value)
    except BadRequest:
        return None


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _no_constants(name: str) -> None:
    raise BadRequest(f"request contains {name}, which is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BadRequest(f"field {key!r} appears twice")
        result[key] = value
    return result


def _request_id(fields: dict[str, Any]) -> str | None:
    value = fields.get("id")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS or not _encodable(value):
        raise BadRequest(f"'id' must be a Unicode string of at most {MAX_ID_CHARS} characters")
    return value


def _encodable(text: str) -> bool:
    # JSON allows lone surrogates ("\ud800") that no UTF-8 message can carry back.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _build(device: str, fields: dict[str, Any], request_id: str | None) -> Request:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        raise BadRequest(f"unknown field {names}; known fields: {', '.join(FIELDS)}")
    since_ns = _time(fields, "since")
    until_ns = _time(fields, "until")
    if since_ns is not None and until_ns is not None and since_ns > until_ns:
        raise BadRequest("'since' is after 'until'")
    return Request(
        device=device,
        since_ns=since_ns,
        until_ns=until_ns,
        topic=_topic(fields),
        limit=_limit(fields),
        descending=_choice(fields, "order", ("asc", "desc")) == "desc",
        replay=_choice(fields, "mode", ("response", "replay")) == "replay",
        raw=_choice(fields, "format", ("json", "raw")) == "raw",
        request_id=request_id,
        rate=_rate(fields),
        retain=_flag(fields, "retain"),
        group=_group(fields),
    )


def _time(fields: dict[str, Any], name: str) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRequest(f"{name!r} must be RFC 3339 text or epoch seconds")
    try:
        return parse_time(value, repr(name))
    except UsageError as exc:
        raise BadRequest(exc.detail) from None


def _topic(fields: dict[str, Any]) -> str | None:
    value = fields.get("topic")
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest("'topic' must be an MQTT topic filter (a string)")
    try:
        check_filter(value)
    except UsageError as exc:
        raise BadRequest(exc.detail) from None
    return value


def _limit(fields: dict[str, Any]) -> int | None:
    value = fields.get("limit")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest("'limit' must be an integer >= 1")
    return value


def _choice(fields: dict[str, Any], name: str, allowed: tuple[str, str]) -> str:
    value = fields.get(name) if fields.get(name) is not None else allowed[0]
    if value not in allowed:
        raise BadRequest(f"{name!r} must be {allowed[0]!r} or {allowed[1]!r}")
    return str(value)


def _rate(fields: dict[str, Any]) -> float | None:
    value = fields.get("rate")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise BadRequest("'rate' must be a finite number of messages per second > 0")
    if value < MIN_RATE:
        # A replay holds one of the few restore slots: one message in 100 s is the slowest.
        raise BadRequest(f"'rate' must be at least {MIN_RATE} messages per second")
    return float(value)


def _group(fields: dict[str, Any]) -> str | None:
    value = fields.get("group")
    if value is None:
        return None
    try:
        return check_member_name(value) if isinstance(value, str) else check_member_name("")
    except UsageError:
        raise BadRequest(
            "'group' must be a group name (letters, digits, '_', '.', '-'); "
            "ungrouped bridges are group 'default'"
        ) from None


def _flag(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name) if fields.get(name) is not None else False
    if not isinstance(value, bool):
        raise BadRequest(f"{name!r} must be true or false")
    return value


def response_topic(
    request_topic: str, given: str | None, restore_prefix: str, any_allowed: bool = False
) -> tuple[str, str | None]:
    """(where to answer, why the requested response topic was refused or None).

    A response topic must lie below the requested device's own subtree,
    `<restore prefix>/<device>/<one or more levels>`: a requester can neither plant answers in
    another device's subtree nor read them there, and a per-device ACL on
    `<prefix>/<device>/#` covers both directions. `any_allowed` (the operator's choice) lifts
    that, except for a topic that looks like a request: each answer would be read as a new one.
    """
    default = request_topic + "/response"
    if given is None:
        return default, None
    if not given or any(c in given for c in "+#"):
        return default, f"response topic {given!r} is not a topic name"
    below = given.removeprefix(restore_prefix + "/")
    looks_like_request = below != given and len(below.split("/")) < 2
    if any_allowed and not looks_like_request:
        return given, None
    own_subtree = request_topic + "/"
    if not given.startswith(own_subtree) or given == own_subtree:
        return default, (
            f"response topic {given!r} must lie under {restore_prefix}/<device>/ "
            f"(one or more levels below the requested device: {own_subtree}...)"
        )
    return given, None
