"""The restore service: answers `<namespace>/restore/<device>` requests over MQTT.

A request is parsed strictly (an unknown field is an error, never "everything"), the device's key
range is scanned (a seek, never a full scan), and each stored message goes out as a JSON envelope,
as its original bytes (`format: raw`), or back to its original topic (`mode: replay`), followed by
exactly one terminal message: `done` (with count and completeness) or `error`.

Publishing is windowed: at most WINDOW messages wait for their PUBACK, so a slow subscriber or a
million-message restore cannot grow memory, and a few restores run at once beside ingest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mqtt_backup.config import BrokerAddress
from mqtt_backup.envelope import message_envelope
from mqtt_backup.errors import BackupError, BrokerRefused, StorageError, UsageError
from mqtt_backup.mqtt import (
    REPLAY_PROPERTY,
    AsyncConnection,
    Inbound,
    OutProps,
    TlsFiles,
    Window,
)
from mqtt_backup.storage import StoredMessage, StoreReader
from mqtt_backup.storage.journal import DroppedReading, Gap, GapLog
from mqtt_backup.tally import TALLY
from mqtt_backup.times import NS_PER_S, format_ts, parse_time
from mqtt_backup.topics import check_filter, filter_matches

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
MAX_ID_CHARS = 1024
WINDOW = 64
MAX_ACTIVE = 4
MAX_WAITING = 64
MIN_RATE = 0.01
DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
UPTIME_TOPIC = "$SYS/broker/uptime"
DROPPED_SAVE_EVERY_NS = 5 * NS_PER_S
# Larger than any sensible sys_interval (Mosquitto's default is 10 s).
RESTART_SLACK_NS = 60 * NS_PER_S
# Mosquitto 2 publishes $SYS values with a 60 s message expiry (a value that did not change
# for a minute is no longer retained).
SYS_EXPIRY_NS = 60 * NS_PER_S
DROPS_UNKNOWN = "broker-drops-unknown.jsonl"
FIELDS = ("since", "until", "topic", "limit", "order", "mode", "format", "id", "rate", "retain")
_YIELD_EVERY = 128


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
    request_id = _request_id(fields)
    try:
        return _build(device, fields, request_id)
    except BadRequest as exc:
        raise BadRequest(exc.reason, request_id) from None


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


# ---- answering ----------------------------------------------------------------------------------


class Publisher(Protocol):
    """Where the service publishes: an MQTT connection."""

    mqtt5: bool

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        props: OutProps | None = None,
    ) -> None:
        """Publish and wait for the broker to take it (PUBACK at QoS 1)."""


@dataclass(slots=True)
class Reply:
    """The response side of one request: topic, correlation data, id, and the message count."""

    conn: Publisher
    topic: str
    correlation: bytes | None
    request_id: str | None = None
    sent: int = 0
    # Answers on a topic an ingest template may match carry the loop marker, so they are not
    # stored as device data (only possible with --response-topics any).
    marked: bool = False
    _data_props: OutProps | None = None

    def _props(self, *user: tuple[str, str], content_type: str | None = None) -> OutProps:
        marker = ((REPLAY_PROPERTY, "1"),) if self.marked else ()
        return OutProps(
            correlation_data=self.correlation, user=marker + user, content_type=content_type
        )

    @staticmethod
    def _encode(body: dict[str, Any]) -> bytes:
        # backslashreplace: a lone surrogate from a stored topic still makes valid JSON text.
        return json.dumps(body, ensure_ascii=False).encode("utf-8", "backslashreplace")

    def _with_id(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.request_id, **body} if self.request_id is not None else body

    def json_message(self, envelope: dict[str, Any]) -> Coroutine[Any, Any, None]:
        """One stored message as a JSON envelope with `id` and `seq`."""
        self.sent += 1
        payload = self._encode(self._with_id({"seq": self.sent, **envelope}))
        # Correlation data only: every MQTT 5 property costs the receiving client parse time.
        if self._data_props is None:
            self._data_props = self._props()
        return self.conn.publish(self.topic, payload, 1, False, self._data_props)

    def raw_message(self, stored: StoredMessage) -> Coroutine[Any, Any, None]:
        """One stored message as its original bytes; its metadata in user properties."""
        self.sent += 1
        record = stored.record
        user = [
            ("mqtt-backup-seq", str(self.sent)),
            ("mqtt-backup-device", stored.device),
            ("mqtt-backup-topic", record.topic),
            ("mqtt-backup-ts", format_ts(stored.ts_ns)),
            ("mqtt-backup-qos", str(record.qos)),
            ("mqtt-backup-retain", str(record.retain).lower()),
            ("mqtt-backup-dup", str(record.dup).lower()),
        ]
        if self.request_id is not None:
            user.append(("mqtt-backup-id", self.request_id))
        original = record.properties
        if original is not None:
            user.extend(original.user)
        if self.marked:
            user.append((REPLAY_PROPERTY, "1"))
        props = OutProps(
            correlation_data=self.correlation,
            user=tuple(user),
            content_type=original.content_type if original else None,
            payload_format=original.payload_format if original else None,
        )
        return self.conn.publish(self.topic, record.payload, 1, False, props)

    async def done(
        self, device: str, count: int, gaps: list[Gap], drops_known: bool = True
    ) -> None:
        """The terminal `done` message, with completeness for the requested window.

        `complete` covers what the bridge can see; when it cannot read the broker's dropped
        counter, `"broker_drops": "unknown"` says that one source of loss is out of its sight.
        """
        body: dict[str, Any] = {"done": True, "device": device, "count": count}
        body["complete"] = not gaps
        if not drops_known:
            body["broker_drops"] = "unknown"
        if gaps:
            body["gaps"] = [g.as_json() for g in gaps]
        await self._terminal(body, "done")

    async def error(self, reason: str) -> None:
        """The terminal `error` message."""
        await self._terminal({"error": reason}, "error")

    async def _terminal(self, body: dict[str, Any], kind: str) -> None:
        payload = self._encode(self._with_id(body))
        props = self._props(("mqtt-backup-terminal", kind), content_type="application/json")
        await self.conn.publish(self.topic, payload, 1, False, props)
        TALLY.restore_finished(kind, self.sent)


def replay_props(stored: StoredMessage) -> OutProps:
    """Properties of a replayed message: marked so ingest never stores it again."""
    original = stored.record.properties
    user = ((REPLAY_PROPERTY, "1"), ("mqtt-backup-ts", format_ts(stored.ts_ns)))
    if original is None:
        return OutProps(user=user)
    return OutProps(
        correlation_data=original.correlation_data,
        user=user + original.user,
        content_type=original.content_type,
        payload_format=original.payload_format,
        message_expiry=original.message_expiry,
        response_topic=original.response_topic,
    )


class Pacer:
    """Holds a replay to `rate` messages per second (none: as fast as the window allows).

    Message k is due at start + k / rate: a late message does not delay the ones after it.
    """

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self._interval = 1 / rate if rate else 0.0
        self._clock = clock
        self._sleep = sleep
        self._start = clock()
        self._count = 0

    async def wait(self) -> None:
        """Sleep until the next message is due."""
        if self._interval:
            due = self._start + self._count * self._interval
            self._count += 1
            delay = due - self._clock()
            if delay > 0:
                await self._sleep(delay)


@dataclass
class RestoreService:
    """Serves restore requests from a reader that follows the writer (a secondary instance)."""

    reader: StoreReader
    gaps: GapLog
    namespace: str = "backup"
    any_response_topic: bool = False
    # Reads the broker's dropped counter; None (tests) means drops are not reported at all.
    dropped: DroppedWatcher | None = None
    window: int = WINDOW
    max_active: int = MAX_ACTIVE
    max_waiting: int = MAX_WAITING
    _active: asyncio.Semaphore = field(init=False)
    _waiting: int = field(init=False, default=0)
    _tasks: set[asyncio.Task[None]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        """Create the concurrency limit on the running loop."""
        self._active = asyncio.Semaphore(self.max_active)

    @property
    def prefix(self) -> str:
        """The restore prefix: `<namespace>/restore`."""
        return f"{self.namespace}/restore"

    def submit(self, message: Inbound, conn: Publisher) -> None:
        """Answer one request in its own task; requests are independent."""
        if message.retain:
            # A retained request, live or stale, would be answered again at every reconnect of
            # every bridge, and the empty publish that clears it would ask for everything.
            log.info("ignoring retained restore request on %s", message.topic)
            return
        task = asyncio.create_task(self.answer(message, conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def answer(self, message: Inbound, conn: Publisher) -> None:
        """Parse, scan and publish one request; any problem becomes one error terminal."""
        device = message.topic.removeprefix(self.prefix + "/")
        topic, refused = response_topic(
            message.topic, message.response_topic, self.prefix, self.any_response_topic
        )
        reply = Reply(conn, topic, message.correlation_data, marked=self.any_response_topic)
        try:
            request = _checked(parse_request(device, message.payload), refused)
            reply.request_id = request.request_id
            await self._run(request, reply)
        except BadRequest as exc:
            reply.request_id = reply.request_id or exc.request_id
            log.info("restore request on %s refused: %s", message.topic, exc.reason)
            await _quietly(reply.error(exc.reason))
        except BackupError as exc:
            # One line either way: on a lost connection the terminal cannot go out either.
            told = await _sent(reply.error(exc.message()))
            log.warning(
                "restore of %s failed%s: %s",
                device,
                "" if told else " (and its error terminal could not be sent)",
                exc.message(),
            )
        except Exception:
            # A bug must still end the stream: the requester gets an error, not a silent timeout.
            log.exception("restore of %s failed on an unexpected error", device)
            await _quietly(reply.error("internal error in the bridge; see its log"))

    async def _run(self, request: Request, reply: Reply) -> None:
        if (request.replay or request.raw) and not reply.conn.mqtt5:
            raise BadRequest("replay and raw format need the bridge to use MQTT 5")
        if self._waiting >= self.max_waiting:
            raise BadRequest("too many restores waiting; try again later")
        self._waiting += 1
        try:
            await self._active.acquire()
        finally:
            self._waiting -= 1
        try:
            count = await self._stream(request, reply)
        finally:
            self._active.release()
        gaps = self.gaps.overlapping(request.since_ns, request.until_ns)
        drops_known = self.dropped is None or not self.dropped.unknown(
            request.since_ns, request.until_ns
        )
        await reply.done(request.device, count, gaps, drops_known)

    async def _stream(self, request: Request, reply: Reply) -> int:
        """Publish the device's messages in the window; returns how many went out."""
        self.reader.refresh()
        # The topic filter is applied here, not in the reader, so that every *scanned* record
        # counts towards the next yield: a filter that matches nothing in a long history must
        # not hold the loop (and every other restore) for the whole scan.
        stored = self.reader.messages(
            request.device, request.since_ns, request.until_ns, None, request.descending
        )
        window = Window(self.window)
        pacer = Pacer(request.rate if request.replay else None)
        send = self._sender(request, reply)
        count = 0
        try:
            for scanned, message in enumerate(stored, 1):
                if scanned % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # let other restores and the connection breathe
                if request.topic is not None and not filter_matches(
                    request.topic, message.record.topic
                ):
                    continue
                count += 1
                await pacer.wait()
                await window.send(send(message))
                if request.limit is not None and count >= request.limit:
                    break  # before scanning on for a next match that would not be sent
            await window.drain()
        except BaseException:
            window.cancel()
            raise
        return count

    def _sender(
        self, request: Request, reply: Reply
    ) -> Callable[[StoredMessage], Coroutine[Any, Any, None]]:
        if request.replay:
            return lambda m: reply.conn.publish(
                m.record.topic,
                m.record.payload,
                m.record.qos,
                request.retain and m.record.retain,
                replay_props(m),
            )
        if request.raw:
            return reply.raw_message
        return lambda m: reply.json_message(message_envelope(m.device, m.ts_ns, m.record))

    async def stop(self) -> None:
        """Cancel restores in progress (they get no terminal: the bridge is going away)."""
        await self.abandon()

    async def abandon(self) -> int:
        """Cancel every restore in progress or waiting; returns how many there were.

        Called when the connection they answer on is gone: they can send nothing more, and
        their requesters' timeouts say so.
        """
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)


def _checked(request: Request, refused_topic: str | None) -> Request:
    if refused_topic is not None:
        raise BadRequest(refused_topic, request.request_id)
    return request


async def _sent(send: Awaitable[None]) -> bool:
    """Whether a terminal went out; a failure is the caller's to mention."""
    try:
        await send
    except BackupError:
        return False
    except Exception:
        log.exception("could not send a restore terminal")
        return False
    return True


async def _quietly(send: Awaitable[None]) -> None:
    # The connection may be gone; a terminal that cannot be sent is logged, not raised.
    try:
        await send
    except BackupError as exc:
        log.warning("could not send a restore terminal: %s", exc.message())
    except Exception:
        log.exception("could not send a restore terminal")


class DroppedWatcher:
    """Records a `broker-dropped` gap when the broker's dropped-message counter rises.

    The counter is broker-wide (`$SYS/broker/publish/messages/dropped`), so a gap says that
    messages *may* be missing in the span, not that the bridge's were. The last reading and until
    when it held are kept in the data directory (`broker-dropped.json`), so a rise while the
    bridge was away (the usual case: its queue overflowed) becomes a gap over the downtime.

    Mosquitto publishes the counter (retained) when it changes and lets the value expire after
    60 s, and publishes `$SYS/broker/uptime` every interval. So, on a new connection:

    - a retained reading is the current value: compared with the saved one (a rise, or a broker
      restart with drops, or a restart while the bridge was away, is a gap; see `_gap`);
    - no retained reading by the second uptime means no change for a minute: a saved value read
      within that minute still holds; an older one leaves the time between it and this
      connection *unknown* (recorded in `broker-drops-unknown.jsonl`), never silently complete;
    - a live reading (not retained) is a change, so always a gap since the last known moment.

    `readable` says whether `$SYS` arrives on the current connection at all: without it (an ACL
    on $SYS, `sys_interval 0`, a broker without the counter) drops are unknown everywhere.
    """

    def __init__(self, gaps: GapLog, data_dir: Path | None = None, broker: str = "") -> None:
        self._gaps = gaps
        self._data_dir = data_dir
        self._unknown = GapLog(data_dir, DROPS_UNKNOWN) if data_dir is not None else None
        self._broker = broker
        saved = DroppedReading.load(data_dir) if data_dir is not None else None
        self._last = saved if saved is not None and saved.broker == broker else None
        self._from_earlier_run = self._last is not None
        self._started_ns: int | None = None
        self._saved_ns = 0
        self._save_failed = False
        self.connected()

    @property
    def dropped(self) -> int | None:
        """The broker's dropped counter as last read (None: never read, or not known)."""
        return self._last.dropped if self._last is not None else None

    def connected(self, now_ns: int | None = None) -> None:
        """A new connection: nothing is known on it until its first readings."""
        self.readable = False
        self._confirmed = False  # the counter's state is known on this connection
        self._connected_ns = now_ns if now_ns is not None else time.time_ns()
        self._beat_ns: int | None = None
        self._beats = 0

    def unknown(self, since_ns: int | None, until_ns: int | None) -> bool:
        """Whether broker drops in the window [since, until) are unknown."""
        if not self.readable:
            return True
        try:
            spans = self._unknown.overlapping(since_ns, until_ns) if self._unknown else []
        except BackupError:
            return True
        return bool(spans)

    def observe_uptime(self, payload: bytes, now_ns: int | None = None) -> None:
        """Take `$SYS/broker/uptime` ("N seconds"): the broker's start, and a heartbeat.

        Counters are published after the uptime, so an uptime reading confirms the counter as of
        the previous one; the first one on a connection is the retained value and confirms
        nothing.
        """
        seconds = _sys_number(payload.strip().removesuffix(b"seconds"))
        if seconds is None:
            return
        now_ns = now_ns if now_ns is not None else time.time_ns()
        previous_beat, self._beat_ns = self._beat_ns, now_ns
        self._beats += 1
        self._started_ns = now_ns - seconds * NS_PER_S
        self.readable = True
        last = self._last
        if not self._confirmed:
            if self._beats >= 2:  # an interval passed and no retained value came
                self._no_retained_value(now_ns)
            return
        beat_confirms = previous_beat is not None and self._beats >= 3
        if last is not None and beat_confirms and previous_beat and previous_beat > last.seen_ns:
            self._keep(dataclasses.replace(last, seen_ns=previous_beat), now_ns)

    def observe(
        self, payload: bytes, retained: bool = True, now_ns: int | None = None
    ) -> Gap | None:
        """Take one reading of the counter; returns the gap it recorded, if any."""
        value = _sys_number(payload)
        if value is None:
            return None
        now_ns = now_ns if now_ns is not None else time.time_ns()
        previous = self._last
        reading = DroppedReading(self._broker, value, now_ns, self._started_ns)
        gap = (
            self._gap(previous, value, now_ns)
            if retained
            else self._change(previous, value, now_ns)
        )
        if retained and not self._confirmed and previous is not None:
            # A retained value may be an interval old: drops just before it may only show in
            # the next reading, whose gap must cover them.
            reading = dataclasses.replace(reading, seen_ns=min(previous.seen_ns, now_ns))
        self.readable = self._confirmed = True
        self._from_earlier_run = False
        self._keep(reading, now_ns, force=True)
        if gap is not None:
            try:
                self._gaps.record(gap)
            except StorageError as exc:
                log.error("could not record a broker-dropped gap: %s", exc.detail)
        return gap

    def _change(self, previous: DroppedReading | None, value: int, now_ns: int) -> Gap | None:
        # Published live: the counter changed while this connection watched it.
        if previous is not None and previous.dropped is not None and value <= previous.dropped:
            return None
        since = previous.seen_ns if previous is not None else self._connected_ns
        log.warning("the broker dropped messages since %s; recorded as a gap", format_ts(since))
        return Gap(since, now_ns, "broker-dropped")

    def _gap(self, previous: DroppedReading | None, value: int, now_ns: int) -> Gap | None:
        if previous is None:
            return None  # the first reading ever (or of this broker): a baseline
        since = format_ts(previous.seen_ns)
        if previous.dropped is None:
            log.warning("the broker's dropped counter changed since %s; recorded as a gap", since)
        elif not _restarted(previous, value, self._started_ns):
            if value <= previous.dropped:
                return None
            log.warning(
                "the broker dropped %d messages since %s; recorded as a gap",
                value - previous.dropped,
                since,
            )
        elif value > 0:
            log.warning(
                "the broker restarted since %s and has dropped %d messages since; "
                "recorded as a gap",
                since,
                value,
            )
        elif self._from_earlier_run:
            log.warning(
                "the broker restarted while the bridge was away (since %s): what it dropped "
                "before its restart cannot be seen; recorded as a broker-dropped gap",
                since,
            )
        else:
            log.info("the broker restarted; its dropped-message counter starts again at 0")
            return None
        return Gap(previous.seen_ns, now_ns, "broker-dropped")

    def _no_retained_value(self, now_ns: int) -> None:
        # Mosquitto lets a $SYS value expire 60 s after it was published: no change since then.
        previous = self._last
        quiet_since = self._connected_ns - SYS_EXPIRY_NS
        value = None
        if previous is not None and previous.seen_ns >= quiet_since:
            value = previous.dropped
        elif previous is not None and self._unknown is not None:
            span = Gap(previous.seen_ns, self._connected_ns, "broker-drops-unknown")
            log.warning(
                "cannot tell whether the broker dropped messages between %s and %s (its "
                "counter did not change in the last minute); restores over that time say "
                '"broker_drops": "unknown"',
                format_ts(span.since_ns),
                format_ts(span.until_ns),
            )
            try:
                self._unknown.record(span)
            except StorageError as exc:
                log.error("could not record that broker drops are unknown: %s", exc.detail)
        self._confirmed = True
        self._from_earlier_run = False
        reading = DroppedReading(self._broker, value, self._connected_ns, self._started_ns)
        self._keep(reading, now_ns, force=True)

    def _keep(self, reading: DroppedReading, now_ns: int, force: bool = False) -> None:
        self._last = reading
        if force or now_ns - self._saved_ns >= DROPPED_SAVE_EVERY_NS:
            self.save(now_ns)

    def save(self, now_ns: int | None = None) -> None:
        """Write the last reading to the data directory (when the watcher has one)."""
        if self._data_dir is None or self._last is None:
            return
        self._saved_ns = now_ns if now_ns is not None else time.time_ns()
        try:
            self._last.save(self._data_dir)
        except StorageError as exc:
            if not self._save_failed:  # once, not at every reading of a full disk
                log.warning("could not save the broker's dropped counter: %s", exc.detail)
            self._save_failed = True
            return
        if self._save_failed:
            log.info("the broker's dropped counter is saved again")
        self._save_failed = False


def _sys_number(payload: bytes) -> int | None:
    # $SYS values are ASCII decimal text; anything else (or a negative) is no reading.
    try:
        text = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    return int(text) if text.isdigit() else None


def _restarted(previous: DroppedReading, value: int, started_ns: int | None) -> bool:
    if previous.dropped is not None and value < previous.dropped:
        return True  # the counter went back: it started again with the broker
    before = previous.broker_started_ns
    # Each estimate of the start is late by up to one $SYS interval; a restart moves it by the
    # broker's whole earlier uptime.
    return before is not None and started_ns is not None and started_ns - before > RESTART_SLACK_NS


# ---- the connection -----------------------------------------------------------------------------

RETRY_MAX_S = 30.0


@dataclass
class ServeOptions:
    """How the restore side connects: broker, identity, protocol, TLS files."""

    address: BrokerAddress
    client_id: str
    protocol: str = "5"
    tls_files: TlsFiles | None = None
    keepalive: int = 30


async def serve(
    service: RestoreService,
    options: ServeOptions,
    stop: asyncio.Event,
    listening: Callable[[bool], None] = lambda _up: None,
) -> None:
    """Answer requests until `stop` is set, reconnecting with backoff when the broker goes away.

    Its own connection (client id `<bridge id>-restore`, no persistent session): a request made
    while the bridge is down gets no answer, and the requester's timeout says so.
    """
    watcher = service.dropped = service.dropped or DroppedWatcher(service.gaps)
    delay = 0.5
    while not stop.is_set():
        try:
            async with AsyncConnection(
                options.address,
                options.client_id,
                protocol=options.protocol,
                tls_files=options.tls_files,
                keepalive=options.keepalive,
            ) as conn:
                watcher.connected()
                await _watch_sys(conn)  # first: the current readings arrive before any request
                # Retain-as-published: a live retained request (or the empty retained publish
                # that clears one) arrives with its flag, so submit() can ignore it.
                await conn.subscribe([f"{service.prefix}/+"], retain_as_published=True)
                delay = 0.5
                log.info("restore service listening on %s/+", service.prefix)
                listening(True)
                try:
                    await _until_stopped(_dispatch(service, conn, watcher), stop)
                finally:
                    listening(False)
                    abandoned = await service.abandon()
                    if abandoned and not stop.is_set():
                        log.warning("%d restores in progress abandoned: connection lost", abandoned)
        except BackupError as exc:
            log.warning("restore service: %s; retrying in %.1fs", exc.message(), delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, RETRY_MAX_S)
    await service.stop()
    watcher.save()


async def _watch_sys(conn: AsyncConnection) -> None:
    """Subscribe to the broker's uptime and dropped counter; a refusal only makes drops unknown."""
    try:
        # Not retain-as-published: $SYS values are published retained, and only without it does
        # the flag tell the stored value (at subscribe) from a change seen live.
        await conn.subscribe([UPTIME_TOPIC, DROPPED_TOPIC])
    except BrokerRefused as exc:
        log.warning(
            "cannot read the broker's dropped-message counter (%s): restores will say "
            '"broker_drops": "unknown"',
            exc.message(),
        )


async def _dispatch(
    service: RestoreService, conn: AsyncConnection, watcher: DroppedWatcher
) -> None:
    async for message in conn.messages():
        if message.topic == DROPPED_TOPIC:
            watcher.observe(message.payload, retained=message.retain)
        elif message.topic == UPTIME_TOPIC:
            watcher.observe_uptime(message.payload)
        elif message.topic.startswith(service.prefix + "/"):
            service.submit(message, conn)


async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    task = asyncio.create_task(work)
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, stopping):
        pending.cancel()
    if task in done:
        task.result()  # re-raise what ended the connection
