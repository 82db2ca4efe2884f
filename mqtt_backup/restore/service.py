"""The restore service: answers `<namespace>/restore/<device>` requests over MQTT.

A request is parsed strictly (an unknown field is an error, never "everything"), the device's key
range is scanned (a seek, never a full scan) in bounded chunks on worker threads (the loop keeps
serving meanwhile), and each stored message goes out as a JSON envelope,
as its original bytes (`format: raw`), or back to its original topic (`mode: replay`), followed by
exactly one terminal message: `done` (with count and completeness) or `error`.

Publishing is windowed: at most WINDOW messages wait for their PUBACK, so a slow subscriber or a
million-message restore cannot grow memory, and a few restores run at once beside ingest.
Beside the service: the watcher of the broker's dropped-message counter, and the serve loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mqtt_backup.config import BrokerTarget
from mqtt_backup.errors import BackupError, BrokerRefused, CorruptRecord, StorageError
from mqtt_backup.logs import count
from mqtt_backup.mqtt import CodecConnection, Delivery
from mqtt_backup.mqtt.backoff import Backoff
from mqtt_backup.mqtt.packets import Outgoing
from mqtt_backup.records import RecordFields, decode_fields
from mqtt_backup.restore.reply import (
    Batches,
    CodecOutbox,
    Outbox,
    Pacer,
    Publisher,
    PublisherOutbox,
    Reply,
    TooLarge,
    replayed,
    too_large,
)
from mqtt_backup.restore.request import BadRequest, Request, parse_request, response_topic
from mqtt_backup.storage import Cursor
from mqtt_backup.storage.journal import DroppedReading, Gap, GapLog
from mqtt_backup.times import NS_PER_S, format_ts
from mqtt_backup.topics import DEFAULT_GROUP, filter_matches

log = logging.getLogger(__name__)
_T = TypeVar("_T")

WINDOW = 64
MAX_ACTIVE = 4
MAX_WAITING = 64
DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
UPTIME_TOPIC = "$SYS/broker/uptime"
DROPPED_SAVE_EVERY_NS = 5 * NS_PER_S
# Larger than any sensible sys_interval (Mosquitto's default is 10 s).
RESTART_SLACK_NS = 60 * NS_PER_S
# Mosquitto 2 publishes $SYS values with a 60 s message expiry (a value that did not change
# for a minute is no longer retained).
SYS_EXPIRY_NS = 60 * NS_PER_S
DROPS_UNKNOWN = "broker-drops-unknown.jsonl"
_YIELD_EVERY = 128
# Records read per chunk (in a worker thread, under the store's read lease): small at first, so
# that the first answer goes out at once; then larger, as each chunk costs a thread hop.
FIRST_CHUNK = 64
CHUNK = 512
RETAINED_TOLD_MAX = 1024


class MessageSource(Protocol):
    """Where restores read: the writer's own handles (`LiveReader`), or a fake in tests."""

    def read_rows(self, cursor: Cursor, limit: int) -> list[tuple[bytes, bytes]]:
        """The next chunk of the cursor's device, (key, stored bytes) (blocking: worker thread)."""
        ...


@dataclass
class RestoreService:
    """Serves restore requests from a source that sees every acknowledged message."""

    reader: MessageSource
    gaps: GapLog
    namespace: str = "backup"
    any_response_topic: bool = False
    # Reads the broker's dropped counter; None (tests) means drops are not reported at all.
    dropped: DroppedWatcher | None = None
    # This bridge's group (None: ungrouped, group "default") and its name in it.
    group: str | None = None
    instance: str | None = None
    window: int = WINDOW
    # The largest packet the broker takes, as configured (`--max-packet-size`): a 3.1.1 broker
    # does not announce its limit; on MQTT 5 the smaller of this and the announced one counts.
    max_packet_size: int | None = None
    max_active: int = MAX_ACTIVE
    max_waiting: int = MAX_WAITING
    _active: asyncio.Semaphore = field(init=False)
    _running: int = field(init=False, default=0)
    _tasks: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _retained_told: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        """Create the concurrency limit on the running loop."""
        self._active = asyncio.Semaphore(self.max_active)

    @property
    def prefix(self) -> str:
        """The restore prefix: `<namespace>/restore`."""
        return f"{self.namespace}/restore"

    def submit(self, message: Delivery, conn: Outbox | Publisher) -> None:
        """Answer one request in its own task; requests are independent."""
        if message.retain:
            # A retained request, live or stale, would be answered again at every reconnect of
            # every bridge, and the empty publish that clears it would ask for everything.
            self._ignore_retained(message.topic)
            return
        task = asyncio.create_task(self.answer(message, conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _limit(self, outbox: Outbox) -> int | None:
        """The largest packet the broker takes: announced (MQTT 5), configured, or unknown."""
        known = [n for n in (outbox.max_packet_size, self.max_packet_size) if n is not None]
        return min(known) if known else None

    def _ignore_retained(self, topic: str) -> None:
        # Once per topic at INFO (a bounded set): thousands of retained requests, replayed at
        # every reconnect, must not flood the log.
        if topic in self._retained_told or len(self._retained_told) >= RETAINED_TOLD_MAX:
            log.debug("ignoring retained restore request on %s", topic)
            return
        self._retained_told.add(topic)
        log.info(
            "ignoring retained restore request on %s (clear it: publish an empty retained "
            "message there)",
            topic,
        )

    async def answer(self, message: Delivery, conn: Outbox | Publisher) -> None:
        """Parse, scan and publish one request; any problem becomes one error terminal."""
        outbox = conn if isinstance(conn, Outbox) else PublisherOutbox(conn, self.window)
        device = message.topic.removeprefix(self.prefix + "/")
        topic, refused = response_topic(
            message.topic, message.response_topic, self.prefix, self.any_response_topic
        )
        reply = Reply(topic, message.correlation_data, marked=self.any_response_topic)
        try:
            request = _checked(parse_request(device, message.payload), refused)
            reply.request_id = request.request_id
            if not self._answers(request):
                return  # the bridges of the group it names answer it
            reply.instance = self._stream_name(request)
            await self._run(request, reply, outbox)
        except BadRequest as exc:
            reply.request_id = reply.request_id or exc.request_id
            log.info("restore request on %s refused: %s", message.topic, exc.reason)
            await _quietly(outbox.send_one(reply.error(exc.reason)))
        except BackupError as exc:
            # One line either way: on a lost connection the terminal cannot go out either.
            told = await _sent(outbox.send_one(reply.error(exc.message())))
            log.warning(
                "restore of %s failed%s: %s",
                device,
                "" if told else " (and its error terminal could not be sent)",
                exc.message(),
            )
        except Exception:
            # A bug must still end the stream: the requester gets an error, not a silent timeout.
            log.exception("restore of %s failed on an unexpected error", device)
            internal = reply.error("internal error in the bridge; see its log")
            await _quietly(outbox.send_one(internal))

    def _answers(self, request: Request) -> bool:
        return request.group is None or request.group == (self.group or DEFAULT_GROUP)

    def _stream_name(self, request: Request) -> str | None:
        """`instance` on every message: in a group, or when a gathering client names the group."""
        if self.group is None and request.group is None:
            return None
        return self.instance

    async def _run(self, request: Request, reply: Reply, outbox: Outbox) -> None:
        if (request.replay or request.raw) and not outbox.mqtt5:
            raise BadRequest("replay and raw format need the bridge to use MQTT 5")
        if self._running >= self.max_active + self.max_waiting:
            raise BadRequest("too many restores waiting; try again later")
        self._running += 1
        try:
            count = await self._stream(request, reply, outbox)
        finally:
            self._running -= 1
        gaps = self.gaps.overlapping(request.since_ns, request.until_ns)
        drops_known = self.dropped is None or not self.dropped.unknown(
            request.since_ns, request.until_ns
        )
        await outbox.send_one(reply.done(request.device, count, gaps, drops_known))

    async def _stream(self, request: Request, reply: Reply, outbox: Outbox) -> int:
        """Publish the device's messages in the window; returns how many went out."""
        batches = Batches(
            outbox.flow(), self._active, Pacer(request.rate if request.replay else None)
        )
        chunks = self._chunks(
            Cursor(request.device, request.since_ns, request.until_ns, request.descending),
            request.limit if request.topic is None else None,  # a filter may skip records
            batches.holding,
        )
        build = self._builder(request, reply)
        count = 0
        try:
            async for rows in chunks:
                count = await self._publish(rows, count, request, build, batches, outbox)
                if request.limit is not None and count >= request.limit:
                    break  # before scanning on for a next match that would not be sent
            await batches.finish()
        except TooLarge:
            await batches.finish()  # what went before it is answered, then the error
            raise
        except BaseException:
            batches.cancel()
            raise
        finally:
            batches.release()
            await chunks.aclose()
        return count

    async def _publish(
        self,
        rows: list[tuple[bytes, bytes]],
        count: int,
        request: Request,
        build: Callable[[RecordFields], Outgoing],
        batches: Batches,
        outbox: Outbox,
    ) -> int:
        """Queue one chunk's messages (decoded here, on the loop); returns the count so far.

        The restore's inner loop: no object per message but its fields and its packet. The
        topic filter is applied here, not in the reader, so that every *scanned* record counts
        towards the next yield: a filter that matches nothing in a long history must not hold
        the loop (and every other restore) for the whole scan.
        """
        limit, wanted, matching = self._limit(outbox), request.limit, request.topic
        if matching is None and limit is None:
            return await self._publish_all(rows, count, wanted, build, batches)
        for scanned, (_, value) in enumerate(rows, 1):
            if scanned % _YIELD_EVERY == 0:
                await batches.flush()
                await asyncio.sleep(0)  # let other restores and the connection breathe
            fields = decode_fields(value)  # CorruptRecord: the stream ends with an error
            if matching is not None and not filter_matches(matching, fields[2]):
                continue
            count += 1
            packet = build(fields)
            if limit is not None and packet.size() > limit:
                raise too_large(packet, limit, request.raw or request.replay, fields)
            if batches.put(packet):
                await batches.flush()
            if wanted is not None and count >= wanted:
                break
        return count

    @staticmethod
    async def _publish_all(
        rows: list[tuple[bytes, bytes]],
        count: int,
        wanted: int | None,
        build: Callable[[RecordFields], Outgoing],
        batches: Batches,
    ) -> int:
        """`_publish` when every record is an answer (no filter, no size limit): the usual one.

        A segment between yields is decoded in one pass, then built in another, and queued at
        once: a loop of per-message tests and calls was a tenth of a restore's CPU. A corrupt
        record is met before anything of its segment is built; the segment is then queued one
        record at a time up to it, as `_publish` does, so what came before it is answered.
        """
        for start in range(0, len(rows), _YIELD_EVERY):
            if start:
                await batches.flush()
                await asyncio.sleep(0)  # let other restores and the connection breathe
            segment = rows[start : start + _YIELD_EVERY]
            if wanted is not None:
                segment = segment[: wanted - count]
            try:
                decoded = [decode_fields(value) for _, value in segment]
            except CorruptRecord:
                for _, value in segment:
                    packet = build(decode_fields(value))  # raises at the corrupt one
                    count += 1
                    await batches.add(packet)
                raise  # pragma: no cover - the loop above raised
            count += len(decoded)
            await batches.add_all([build(fields) for fields in decoded])
            if wanted is not None and count >= wanted:
                break
        return count

    async def _chunks(
        self, cursor: Cursor, most: int | None, ahead: Callable[[], bool] = lambda: False
    ) -> AsyncGenerator[list[tuple[bytes, bytes]]]:
        """The cursor's stored records (up to `most`), chunk by chunk, read in worker threads.

        While `ahead()` holds (the restore has its slot and sends), the next chunk is read
        while this one is sent: waiting for each read, the window ran dry at every other
        chunk. A restore waiting for its slot holds one chunk, as before.
        """
        limit = FIRST_CHUNK
        pending: asyncio.Future[list[tuple[bytes, bytes]]] | None = None
        try:
            while pending is not None or not cursor.done:
                if pending is None:
                    pending = self._read(cursor, limit if most is None else min(limit, most))
                chunk = await pending
                pending = None
                if most is not None:
                    most -= len(chunk)
                    if most <= 0:
                        cursor.done = True  # read to the limit: nothing more is sent
                limit = CHUNK
                if not cursor.done and ahead():
                    pending = self._read(cursor, limit if most is None else min(limit, most))
                yield chunk
        finally:
            if pending is not None:
                # Abandoned: the worker may still finish it; its rows (or error) are dropped.
                pending.cancel()

    def _read(self, cursor: Cursor, limit: int) -> asyncio.Future[list[tuple[bytes, bytes]]]:
        """The next chunk, read in a worker thread (a task: it runs while the loop sends)."""
        return asyncio.ensure_future(asyncio.to_thread(self.reader.read_rows, cursor, limit))

    @staticmethod
    def _builder(request: Request, reply: Reply) -> Callable[[RecordFields], Outgoing]:
        if request.replay:
            return lambda fields: replayed(fields, request.retain)
        if request.raw:
            return lambda fields: reply.raw_message(request.device, fields)
        return reply.json_messages(request.device)

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
                "the broker dropped %s since %s; recorded as a gap",
                count(value - previous.dropped, "message"),
                since,
            )
        elif value > 0:
            log.warning(
                "the broker restarted since %s and has dropped %s since; recorded as a gap",
                since,
                count(value, "message"),
            )
        elif self._from_earlier_run:
            # Its counter, at 0, covers everything since its start: only the time before that,
            # while the bridge was away, is unknown. (Our estimate of the start comes no earlier
            # than the real one: the uptime read may be an interval old, never from the future.)
            until = max(previous.seen_ns, min(self._started_ns or now_ns, now_ns))
            log.warning(
                "the broker restarted while the bridge was away (between %s and %s): what it "
                "dropped before its restart cannot be seen; recorded as a broker-dropped gap",
                since,
                format_ts(until),
            )
            return Gap(previous.seen_ns, until, "broker-dropped")
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


@dataclass
class ServeOptions:
    """How the restore side connects: to which broker, as whom."""

    target: BrokerTarget
    client_id: str
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
    backoff = Backoff()
    while not stop.is_set():
        try:
            async with contextlib.AsyncExitStack() as stack:
                conn = _connection(options, service.window)
                if await _unless_stopped(stack.enter_async_context(conn), stop) is None:
                    break  # stopped during the handshake
                watcher.connected()
                await _watch_sys(conn)  # first: the current readings arrive before any request
                # Retain-as-published: a live retained request (or the empty retained publish
                # that clears one) arrives with its flag, so submit() can ignore it.
                await conn.subscribe([f"{service.prefix}/+"], retain_as_published=True)
                backoff.reset()
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
            delay = backoff.next()
            log.warning("restore service: %s; retrying in %.1fs", exc.message(), delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
    await service.stop()
    watcher.save()


if TYPE_CHECKING:
    from mqtt_backup.mqtt import AsyncConnection

    Connection = CodecConnection | AsyncConnection


def _connection(options: ServeOptions, window: int) -> Connection:
    """MQTT 5: the codec connection, whose one window all restores share; 3.1.1: aiomqtt."""
    if not options.target.mqtt5:
        from mqtt_backup.mqtt import AsyncConnection  # noqa: PLC0415 - aiomqtt for 3.1.1 only

        return AsyncConnection(options.target, options.client_id, keepalive=options.keepalive)
    conn = CodecConnection(options.target, options.client_id, keepalive=options.keepalive)
    conn.send_window = window
    return conn


async def _watch_sys(conn: Connection) -> None:
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


async def _dispatch(service: RestoreService, conn: Connection, watcher: DroppedWatcher) -> None:
    outbox: Outbox = (
        CodecOutbox(conn)
        if isinstance(conn, CodecConnection)
        else PublisherOutbox(conn, service.window)
    )
    async for message in _incoming(conn):
        if message.topic == DROPPED_TOPIC:
            watcher.observe(message.payload, retained=message.retain)
        elif message.topic == UPTIME_TOPIC:
            watcher.observe_uptime(message.payload)
        elif message.topic.startswith(service.prefix + "/"):
            service.submit(message, outbox)


async def _incoming(conn: Connection) -> AsyncIterator[Delivery]:
    """Requests and $SYS readings until the connection drops (then BrokerUnreachable)."""
    if not isinstance(conn, CodecConnection):  # aiomqtt (MQTT 3.1.1)
        async for message in conn.messages():
            yield message
        return
    while True:
        batch = await conn.receive()
        for delivery in batch:
            yield delivery
        conn.ack(batch)  # a request is a task of its own by now


async def _unless_stopped(work: Coroutine[Any, Any, _T], stop: asyncio.Event) -> _T | None:
    """`work`'s result; None when `stop` is set first (`work` is then cancelled, and has ended).

    For the handshake: a broker that takes TCP and then says nothing holds it for its whole
    timeout, and a stop must not wait for that (SIGTERM took ~10 s).
    """
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        return None
    return task.result()


async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    task = asyncio.create_task(work)
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, stopping):
        pending.cancel()
    if task in done:
        task.result()  # re-raise what ended the connection
