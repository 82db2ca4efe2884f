"""The MQTT 5 ingest transport on asyncio and the sans-IO codec `mqtt5`.

`AsyncIngest` does what `PahoIngest` does (persistent session, QoS 1, acks only after the synced
write, reconnect with backoff, hold while storage fails) with the work per message cut to what
the codec gives: every whole packet of a `data_received` call is parsed and offered to the commit
pipeline, and when the socket has nothing more to read the batch goes to a worker thread for its
synced writes. The loop goes on reading meanwhile; when the commit returns, all PUBACKs of its
batch leave in one `transport.write` and what arrived in between is committed next (one commit in
flight: under load the group commit grows by itself).

One event loop of its own runs it; `connect` and `run` keep the blocking signatures of
`PahoIngest`. `run` also runs the bridge's other services (restore, control socket) as a task of
the same loop (`beside`). The bridge's `tick` runs on the loop; whatever in it touches the store
settles the commit in flight first. While a unit of an operation owns the store the bridge
`hold`s commits: what arrives is held exactly as while storage fails (within the broker's window,
reading paused when the hold is full), one hold path; between two units it is committed
(`commit_held`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import struct
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, cast

import mqtt5

from mqtt_backup.errors import (
    BrokerError,
    BrokerRefused,
    BrokerUnreachable,
    ConfigError,
    SessionTakenOver,
    StorageUnavailable,
)
from mqtt_backup.mqtt.backoff import Backoff
from mqtt_backup.mqtt.codec import _not_mqtt, _refused, lost_connection
from mqtt_backup.mqtt.packets import read5
from mqtt_backup.mqtt.session import (
    CAUGHT_UP_BELOW,
    CONNECT_TIMEOUT_S,
    REPLAY_PROPERTY,
    SESSION_TAKEN_OVER,
    Hooks,
    Presence,
    Session,
    Sink,
    Stall,
    describe,
    taken_over,
    tls_context,
)
from mqtt_backup.records import Properties, Record, stored_flags

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0
# asyncio reads at most 256 KiB at a time; a shorter read means the socket was empty.
DRAINED_BELOW_BYTES = 64 * 1024
TICK_S = 0.1  # how often the bridge's periodic work runs and `stop` is looked at
_PUBLISH = mqtt5.PublishPacket
_PINGREQ = mqtt5.PingReqPacket().write()
_DISCONNECT = mqtt5.DisconnectPacket().write()
# Our own packet ids: SUBSCRIBE 1, UNSUBSCRIBE 2, the status publishes (online, offline) 3 and 4.
_ONLINE_ID, _OFFLINE_ID = 3, 4
_T = TypeVar("_T")


class PipelinedSink(Sink, Protocol):
    """A sink that can commit in a worker thread (`ingest.CommitPipeline` is one)."""

    @property
    def committing(self) -> bool:
        """A commit runs in the worker thread, not settled yet."""

    def commit_in_background(self, executor: Executor) -> Future[None] | None:
        """Start storing the batch on `executor`; None when nothing waits or one is in flight."""

    def settle(self, which: Future[None] | None = None) -> int | None:
        """Finish the commit in flight (acks in receive order); StorageUnavailable if it failed."""

    def offer_publishes(
        self,
        topics: Sequence[bytes],
        payloads: Sequence[bytes],
        flags: Sequence[int],
        tokens: Sequence[int],
        received_ns: int,
    ) -> bool:
        """Take messages without properties from their wire parts; whether the batch is full."""


class Beside(Protocol):
    """Services that run on the ingest loop beside it (the bridge's restore and control socket)."""

    async def start(self) -> None:
        """Start them (the loop runs; ingest is connected)."""

    async def settle(self) -> None:
        """Before the last commit: end what touches the store, and start nothing more."""

    async def stop(self) -> None:
        """After the shutdown: stop them."""


def _properties(packet: mqtt5.PublishPacket) -> Properties | None:
    """The properties worth storing, or None (most telemetry has none: no object then)."""
    user = packet.user_properties
    content_type = packet.content_type
    response_topic = packet.response_topic
    correlation = packet.correlation_data
    expiry = packet.message_expiry_interval
    payload_format = packet.payload_format_indicator
    if not (user or content_type or response_topic or correlation or payload_format) and (
        expiry is None
    ):
        return None
    return Properties(
        # MQTT 5 cannot tell an absent indicator from 0 ("unspecified bytes"): both mean the same.
        payload_format=payload_format or None,
        message_expiry=expiry,
        content_type=content_type,
        response_topic=response_topic,
        correlation_data=correlation,
        user=tuple(user),
    )


def _remaining_length(buffer: bytes, at: int, end: int) -> tuple[int, int] | None:
    """(remaining length, where the rest starts) of the packet whose length starts at `at`.

    None while the length is not all there; ValueError when it is longer than 4 bytes.
    """
    value, shift = 0, 0
    while at < end:
        byte = buffer[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 21:
            raise ValueError("Invalid remaining length")
    return None


# The stored flags of a QoS 1 PUBLISH by the low half of its first byte (DUP, QoS, retain).
_QOS1_FLAGS = tuple(stored_flags(1, bool(low & 1), bool(low & 8)) for low in range(16))
_QOS1_PUBLISH_MASK, _QOS1_PUBLISH = 0xF6, 0x32  # packet type 3, QoS bits 01; DUP, retain any
# A QoS 1 PUBLISH that the fast path takes is at least: topic length (2), a topic byte, packet id
# (2), property length 0 (1).
_SMALLEST_FAST = 6


class _Wire(asyncio.Protocol):
    """One connection: parses every packet, feeds the sink, commits when the reads run dry."""

    def __init__(self, ingest: AsyncIngest, sink: PipelinedSink, generation: int) -> None:
        loop = asyncio.get_running_loop()
        self._ingest = ingest
        self._sink = sink
        self._generation = generation << 16
        self._buffer = b""
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[mqtt5.ConnAckPacket] = loop.create_future()
        self.suback: asyncio.Future[mqtt5.SubAckPacket] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.failure: BrokerError | None = None
        self.serving = False  # commit what arrives (only once the handshake is through)
        self.paused = False
        self.heard_at = loop.time()
        self.pinged_at = loop.time()
        self.unanswered_since: float | None = None  # the first PINGREQ since the broker spoke

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (a stream Protocol gets a Transport)."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Offer every whole packet to the sink, then commit the batch (the socket ran dry)."""
        if self.failure is not None:
            return
        self.heard_at = asyncio.get_running_loop().time()
        self.unanswered_since = None
        buffer = self._buffer + data if self._buffer else data
        offset = self._parse(buffer)
        self._buffer = buffer[offset:]
        if self.serving and self.failure is None:
            # A read shorter than asyncio's largest emptied the socket at this moment.
            drained_at = time.time_ns() if len(data) < DRAINED_BELOW_BYTES else None
            self._ingest.commit_or_hold(self, drained_at=drained_at)

    def _parse(self, buffer: bytes) -> int:
        """Dispatch the whole packets at the start of `buffer`; how many bytes they took.

        Hand-written for the one packet that counts, a QoS 1 PUBLISH without properties: the
        parts of those go to the sink in one call per read (no packet object, no topic decoded
        but once per topic by the sink). Every other packet, a PUBLISH with properties
        included, is the codec's, after what came before it. Packets of one read share its
        receive time.
        """
        generation = self._generation
        topics: list[bytes] = []
        payloads: list[bytes] = []
        flags: list[int] = []
        tokens: list[int] = []
        offset, end = 0, len(buffer)
        try:
            # Nothing after a failure (a DISCONNECT, a QoS 2 message): the connection is dead.
            while offset + 1 < end and self.failure is None:
                first, size, at = buffer[offset], buffer[offset + 1], offset + 2
                if size & 0x80:
                    found = _remaining_length(buffer, offset + 1, end)
                    if found is None:
                        break
                    size, at = found
                stop = at + size
                if stop > end:
                    break  # only part of the next packet so far
                if first & _QOS1_PUBLISH_MASK == _QOS1_PUBLISH and size >= _SMALLEST_FAST:
                    topic_end = at + 2 + (buffer[at] << 8 | buffer[at + 1])
                    if at + 2 < topic_end <= stop - 3 and buffer[topic_end + 2] == 0:
                        topics.append(buffer[at + 2 : topic_end])
                        payloads.append(buffer[topic_end + 3 : stop])
                        flags.append(_QOS1_FLAGS[first & 0x0F])
                        tokens.append(generation | buffer[topic_end] << 8 | buffer[topic_end + 1])
                        offset = stop
                        continue
                self._offer(topics, payloads, flags, tokens)  # what came first goes first
                self._decode(memoryview(buffer)[offset:stop])
                offset = stop
            self._offer(topics, payloads, flags, tokens)
        except ValueError as exc:  # UnicodeDecodeError included: a topic that is not UTF-8
            self.fail(BrokerError(f"malformed packet from the broker: {exc}"))
        return offset

    def _offer(
        self, topics: list[bytes], payloads: list[bytes], flags: list[int], tokens: list[int]
    ) -> None:
        """Offer the fast path's messages so far to the sink, and empty the lists."""
        if tokens:
            full = self._sink.offer_publishes(topics, payloads, flags, tokens, time.time_ns())
            topics.clear()
            payloads.clear()
            flags.clear()
            tokens.clear()
            if full and self.serving:
                self._ingest.commit_or_hold(self)

    def _decode(self, packet_bytes: memoryview) -> None:
        """One whole packet by the codec (ValueError when it is malformed)."""
        with packet_bytes:
            packet, _ = read5(packet_bytes)
        if type(packet) is not _PUBLISH:
            self._dispatch(packet)
            return
        publish = packet
        qos = int(publish.qos)
        if qos == 2:
            # We subscribe at QoS 1: a broker must downgrade. Not acknowledging it is safe.
            self.fail(BrokerError("the broker sent a QoS 2 message to a QoS 1 subscription"))
            return
        props = _properties(publish)
        record = Record(
            publish.topic, publish.payload, qos, publish.retain, publish.duplicate, props
        )
        packet_id = publish.packet_id  # None at QoS 0: nothing to acknowledge
        token = None if packet_id is None else self._generation | packet_id
        replayed = props is not None and any(k == REPLAY_PROPERTY for k, _ in props.user)
        sink = self._sink
        sink.offer(record, token, replayed)
        if self.serving and sink.full():
            self._ingest.commit_or_hold(self)

    def _dispatch(self, packet: mqtt5.Packet) -> None:
        match packet:
            case mqtt5.ConnAckPacket():
                if not self.connack.done():
                    self.connack.set_result(packet)
            case mqtt5.SubAckPacket():
                if not self.suback.done():
                    self.suback.set_result(packet)
            case mqtt5.PingRespPacket() | mqtt5.UnsubAckPacket():
                pass
            case mqtt5.PubAckPacket():  # of a status publish
                if int(packet.reason_code) >= 128:
                    log.warning("the broker refused the bridge's status (%s)", packet.reason_code)
            case mqtt5.DisconnectPacket() if int(packet.reason_code) == SESSION_TAKEN_OVER:
                self.fail(taken_over(self._ingest.session.client_id))
            case mqtt5.DisconnectPacket():
                reason = packet.reason_str or packet.reason_code.name
                self.fail(BrokerUnreachable(f"the broker closed the connection: {reason}"))
            case _:
                self.fail(BrokerError(f"unexpected {type(packet).__name__} from the broker"))

    def write(self, data: bytes) -> None:
        """Send bytes unless the connection is failing."""
        if self.failure is None and self.transport is not None:
            self.transport.write(data)

    def pause(self) -> None:
        """Stop reading (the broker keeps what it has not sent)."""
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True

    def resume(self) -> None:
        """Read again; the silence before counts for nothing."""
        if self.paused and self.transport is not None:
            self.transport.resume_reading()
            self.paused = False
            self.heard_at = asyncio.get_running_loop().time()
            self.unanswered_since = None

    def connection_lost(self, exc: Exception | None) -> None:
        """The first reason wins; everyone waiting learns it."""
        self.fail(lost_connection(exc))
        if not self.lost.done():
            self.lost.set_result(None)

    def fail(self, error: BrokerError) -> None:
        """End the connection with `error`: waiters raise it, the transport closes."""
        if self.failure is None:
            self.failure = error
        for waiter in (self.connack, self.suback):
            if not waiter.done():
                waiter.set_exception(self.failure)
                waiter.exception()  # retrieved: nobody may be waiting any more
        if self.transport is not None:
            self.transport.close()


class AsyncIngest:
    """Ingest transport on asyncio + `mqtt5`: MQTT 5, persistent session, acks after the sync."""

    def __init__(self, session: Session, filters: Sequence[str], hooks: Hooks) -> None:
        if not session.target.mqtt5:
            raise ConfigError(
                "the asyncio transport speaks MQTT 5 only",
                "use --transport paho with --protocol 3.1.1",
            )
        self.session = session
        self.filters = list(filters)
        self._hooks = hooks
        self.sink: PipelinedSink | None = None
        self.stall = Stall()
        self._executor: ThreadPoolExecutor | None = None  # the commit's worker thread
        self._drained_at: int | None = None  # the socket ran dry, the broker had nothing more
        self._ssl = self._ssl_context()
        self._generation = 0  # the low 16 bits of the sink's number of the open connection
        self._wire: _Wire | None = None
        self._connected = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held = False  # an operation owns the store: commit nothing, hold what comes
        self._commit_done: asyncio.Future[None] | None = None  # the last commit started

    @property
    def connected(self) -> bool:
        """Whether a connection to the broker is up."""
        return self._connected

    @property
    def paused(self) -> bool:
        """Whether reading is paused (storage fails and the hold is full)."""
        return self._wire is not None and self._wire.paused

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.session.address.tls:
            return None
        return tls_context(self.session.target.tls_files)

    def _run_loop(self, work: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(work)

    def _close_loop(self) -> None:
        if self._executor is not None:
            # A commit still in flight (only after an error) ends first: unacknowledged, safe.
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    # ---- connecting ----------------------------------------------------------------------------

    def connect(self, sink: PipelinedSink, known_filters: Sequence[str]) -> bool:
        """First connection: BrokerError when the broker cannot be reached or refuses.

        Returns whether the broker still had the session. MQTT 5 subscribes every filter each
        time (retain handling 1 re-sends nothing); `known_filters` no longer configured go.
        """
        self.sink = sink
        try:
            return self._run_loop(self._connect(sink, known_filters, first=True))
        except BaseException:
            self._close_loop()
            raise

    async def _connect(
        self, sink: PipelinedSink, known_filters: Sequence[str], first: bool = False
    ) -> bool:
        wire = await self._open(sink, first)
        try:
            return await self._handshake(wire, known_filters)
        except BaseException:
            await self._drop()
            raise

    async def _open(self, sink: PipelinedSink, first: bool) -> _Wire:
        loop = asyncio.get_running_loop()
        # A new connection voids the acks of the old one; count it before any packet is read.
        # The sink counts connections; a token keeps 16 bits of the number beside the packet id.
        generation = self._generation = sink.new_connection() & 0xFFFF
        address = self.session.address
        try:
            # Not `asyncio.wait_for`: on 3.11 it can swallow a cancellation (cpython gh-86296).
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, wire = await loop.create_connection(
                    lambda: _Wire(self, sink, generation),
                    address.host,
                    address.port,
                    ssl=self._ssl,
                    server_hostname=address.host if self._ssl else None,
                )
        except TimeoutError:
            raise BrokerUnreachable(
                f"{address}: no connection within {CONNECT_TIMEOUT_S:g} s",
                "check --broker and that the broker runs",
            ) from None
        except OSError as exc:  # ssl.SSLError (e.g. certificate verify failed) included
            if not first:
                raise BrokerUnreachable(f"{address}: {describe(exc)}") from exc
            tls = isinstance(exc, ssl.SSLError)
            hint = "check --ca" if tls else "check --broker and that the broker runs"
            raise BrokerUnreachable(f"{address}: {describe(exc)}", hint) from exc
        self._wire = wire
        return wire

    async def _handshake(self, wire: _Wire, known_filters: Sequence[str]) -> bool:
        s = self.session
        password = s.address.password
        wire.write(
            mqtt5.ConnectPacket(
                s.client_id,
                username=s.address.username,
                password=password.encode("utf-8") if password is not None else None,
                clean_start=False,  # resume the session: what was queued meanwhile arrives
                keep_alive=s.keepalive,
                session_expiry_interval=s.session_expiry,
                receive_max=s.receive_maximum,
                will=self._will(),
            ).write()
        )
        connack = await self._answer(wire.connack, "CONNACK")
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            raise _refused(s.address, connack)
        await self._subscribe(wire)
        gone = [f for f in known_filters if f not in self.filters]
        if gone and connack.session_present:
            wire.write(mqtt5.UnsubscribePacket(2, gone).write())
        self._announce(wire, online=True)
        wire.serving = True
        self._connected = True
        self._hooks.connected(connack.session_present, self.filters)
        return connack.session_present

    def _will(self) -> mqtt5.Will | None:
        presence = self.session.presence
        if presence is None:
            return None
        return mqtt5.Will(
            presence.topic, payload=presence.offline, qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True
        )

    def _announce(self, wire: _Wire, online: bool) -> None:
        """Publish the retained status (QoS 1; its PUBACK is only looked at for a refusal)."""
        presence = self.session.presence
        if presence is not None:
            packet = mqtt5.PublishPacket(
                presence.topic,
                presence.online if online else presence.offline,
                qos=mqtt5.QoS.AT_LEAST_ONCE,
                retain=True,
                packet_id=_ONLINE_ID if online else _OFFLINE_ID,
            )
            wire.write(packet.write())

    async def _answer(self, future: asyncio.Future[_T], what: str) -> _T:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                return await asyncio.shield(future)
        except TimeoutError:
            raise BrokerUnreachable(f"no {what} from {self.session.address} in time") from None
        except BrokerError as exc:
            if what == "CONNACK":
                raise _not_mqtt(self.session.address, True, exc) from exc
            raise

    async def _subscribe(self, wire: _Wire) -> None:
        options = [
            mqtt5.TopicFilter(
                f,
                max_qos=mqtt5.QoS.AT_LEAST_ONCE,
                # No-local is a protocol error on a shared subscription (MQTT-3.8.3-4).
                no_local=not f.startswith("$share/"),
                retain_as_published=True,
                retain_handling=mqtt5.RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS,
            )
            for f in self.filters
        ]
        wire.write(mqtt5.SubscribePacket(1, options).write())
        suback = await self._answer(wire.suback, "SUBACK")
        codes = suback.reason_codes
        refused = [
            f"{f} ({c.name})" for f, c in zip(self.filters, codes, strict=False) if int(c) >= 128
        ]
        if refused or len(codes) != len(self.filters):
            raise BrokerRefused(
                f"subscription to {', '.join(refused or self.filters)} refused",
                "check the broker's ACL for the bridge's user",
            )
        for f, code in zip(self.filters, codes, strict=True):
            if code == mqtt5.SubAckReasonCode.GRANTED_QOS_AT_MOST_ONCE:
                log.warning("the broker granted only QoS 0 for %s: it may drop messages", f)

    # ---- running -------------------------------------------------------------------------------

    def run(self, sink: PipelinedSink, stop: threading.Event, beside: Beside | None = None) -> None:
        """Feed the sink until `stop` is set, reconnecting with backoff; then shut down in order.

        `beside`: the bridge's other services, on this loop from start to end: started first,
        settled before the last commit (nothing of theirs touches the store after it), stopped
        after the shutdown.
        """
        self.sink = sink
        try:
            self._run_loop(self._run(sink, stop, beside))
        finally:
            self._close_loop()

    async def _run(self, sink: PipelinedSink, stop: threading.Event, beside: Beside | None) -> None:
        try:
            try:
                if beside is not None:
                    await beside.start()  # inside: what it started is stopped if it fails
                await self._serve(sink, stop)
            finally:
                if beside is not None:
                    await beside.settle()
                await self._shutdown(sink)
        finally:
            if beside is not None:
                await beside.stop()
            # loop.close() does not wait for it: a restore's chunk read queued there would run
            # after the store closed.
            await asyncio.get_running_loop().shutdown_default_executor()

    async def _serve(self, sink: PipelinedSink, stop: threading.Event) -> None:
        while not stop.is_set():
            wire = self._wire
            if not self._connected or wire is None:
                await self._reconnect(sink, stop)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await asyncio.shield(wire.lost)
            if isinstance(wire.failure, SessionTakenOver):
                self._connected = False  # the shutdown stores what is pending; its acks are void
                raise wire.failure
            if wire.failure is not None:
                self._connection_lost(wire.failure.detail)
                continue
            # Right after the wait, so that what the socket held was read first (a long
            # operation in `tick` blocks the loop: the broker's answers wait meanwhile).
            self._housekeeping(wire, sink)
            self._hooks.tick()

    def _housekeeping(self, wire: _Wire, sink: PipelinedSink) -> None:
        """Between reads: retry a stalled commit when due, ping, notice a silent broker."""
        if wire.paused and not self.stall.active and not sink.committing and not self._held:
            wire.resume()  # the commit it waited for was settled by the bridge (an operation)
        if self.stall.active and self.stall.seconds_left() == 0:
            self.commit_or_hold(wire, retry=True)
        elif not self.stall.active and sink.has_work:
            self.commit_or_hold(wire)  # a batch left over from the handshake
        now = asyncio.get_running_loop().time()
        if not self.stall.active and not sink.has_work and now - wire.heard_at >= TICK_S:
            sink.caught_up(time.time_ns())  # a tick went by with nothing from the broker
        keepalive = self.session.keepalive
        asked = wire.unanswered_since
        # Only a PINGREQ left unanswered for a keepalive condemns the broker (silence alone may
        # be ours: a long commit). While reading is paused its answers wait in the socket.
        if asked is not None and not wire.paused and now - asked > keepalive:
            silent = now - wire.heard_at
            wire.fail(BrokerUnreachable(f"no answer from the broker for {silent:.0f} s"))
        elif now - wire.pinged_at >= keepalive / 2:
            self._ping(wire, now)

    def commit_or_hold(
        self, wire: _Wire, retry: bool = False, drained_at: int | None = None
    ) -> None:
        """Start committing the batch in the worker thread; while storage fails, hold.

        One commit at a time: while one is in flight, what arrives makes the next batch, which
        grows past `batch_max` if it must (reading on is what overlaps the parse with the
        fsyncs); reading pauses only when the hold is full, as while storage fails.
        `drained_at`: a read found the socket empty then.
        """
        sink = self.sink
        if sink is None:
            return
        if drained_at is not None and sink.pending < CAUGHT_UP_BELOW:
            # Drained, with fewer unacknowledged than any broker's window: the broker had nothing
            # held back, so all it had sent by then is stored once the next batch is.
            self._drained_at = drained_at
        if sink.committing:
            if not sink.can_hold():
                wire.pause()  # resumed when the commit in flight returns
            return
        if (self.stall.active and not retry) or self._held:
            if not sink.can_hold():
                wire.pause()
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ingest.commit")
        done = sink.commit_in_background(self._executor)
        drained_at, self._drained_at = self._drained_at, None
        if done is None:  # nothing to store or acknowledge
            self._stored(wire, drained_at)
            return
        wrapped = asyncio.wrap_future(done)
        wrapped.add_done_callback(lambda _: self._committed(wire, done, drained_at, wrapped))
        self._commit_done = wrapped

    def _committed(
        self,
        wire: _Wire,
        done: Future[None],
        drained_at: int | None,
        wrapped: asyncio.Future[None] | None = None,
    ) -> None:
        """A commit returned from the worker thread: settle it here, then start the next.

        Its outcome is read from `done`; the loop's wrapper of it is marked read too, or a
        failed commit would also be logged by asyncio as a never-retrieved exception.
        """
        if wrapped is not None and not wrapped.cancelled():
            wrapped.exception()
        sink = self.sink
        if sink is None:
            return
        try:
            stored = sink.settle(done)
        except StorageUnavailable as exc:
            self.stall.failed(exc)
            if sink.can_hold():
                wire.resume()  # hold what comes, within the broker's window
            else:
                wire.pause()
            return
        if stored is None:
            return  # settled already, by a commit on the loop (an operation, the shutdown)
        self._stored(wire, drained_at)
        if wire is self._wire and wire.serving and wire.failure is None and sink.has_work:
            self.commit_or_hold(wire)  # what arrived meanwhile: the next group commit

    def _stored(self, wire: _Wire, drained_at: int | None) -> None:
        """A commit worked: storage is fine, reading goes on."""
        self.stall.cleared()
        wire.resume()
        if drained_at is not None and self.sink is not None:
            self.sink.caught_up(drained_at)

    def announce(self, presence: Presence) -> None:
        """A new retained status (the partitions changed), published now when connected.

        It is also the one of the next connect and of the stop. The will set at connect keeps
        the old body until the next connect (MQTT cannot change a will): the broker publishes
        it only when the bridge dies, with `"state": "offline"`.
        """
        self.session = dataclasses.replace(self.session, presence=presence)
        wire = self._wire
        if wire is not None and wire.serving and wire.failure is None:
            self._announce(wire, online=True)

    def hold(self, on: bool) -> None:
        """Commit nothing while on (an operation owns the store); off: commit what was held."""
        self._held = on
        wire = self._wire
        if not on and wire is not None and wire.serving and wire.failure is None:
            if self.sink is not None and self.sink.has_work:
                self.commit_or_hold(wire)  # resumes reading once it is stored
            elif not self.stall.active:
                wire.resume()

    async def settled(self) -> None:
        """Until the commit in flight, if any, is settled: the loop reads on meanwhile.

        The worker's commit is awaited; `_committed`, its done callback, settles it first (a
        failure starts the stall). For the bridge's operations, with commits held: no other
        starts after it.
        """
        sink, done = self.sink, self._commit_done
        if sink is not None and sink.committing and done is not None:
            await asyncio.wait([done])

    async def commit_held(self) -> None:
        """Store what is held and acknowledge it, while an operation holds commits.

        One commit in the worker thread, as any other (the loop reads on meanwhile); the hold is
        on again before it returns, so no commit follows it into the operation. A failure starts
        the stall, as always. Nothing happens without a connection to acknowledge on: what is
        held waits for the operation's end.
        """
        wire, sink = self._wire, self.sink
        if wire is None or sink is None or not wire.serving or wire.failure is not None:
            return
        self._held = False
        try:
            self.commit_or_hold(wire)
        finally:
            self._held = True
        await self.settled()

    @staticmethod
    def _ping(wire: _Wire, now: float) -> None:
        wire.pinged_at = now
        if wire.unanswered_since is None:
            wire.unanswered_since = now
        wire.write(_PINGREQ)

    def ack(self, tokens: Sequence[object]) -> None:
        """Acknowledge stored messages in receive order, all in one write.

        Tokens of an earlier connection are skipped: its packet ids mean nothing on this one.
        """
        wire = self._wire
        if wire is None or not tokens:
            return
        generation = self._generation
        # A PUBACK without reason code or properties is four bytes: 0x40, 2, packet id.
        ints = cast("Sequence[int]", tokens)
        acks = [0x40020000 | (t & 0xFFFF) for t in ints if t >> 16 == generation]
        if acks:
            wire.write(struct.pack(f">{len(acks)}I", *acks))

    def _connection_lost(self, why: str) -> None:
        if self._connected:
            self._connected = False
            self._hooks.disconnected(why)

    async def _drop(self) -> None:
        """Close the connection at once and let its socket go."""
        wire, self._wire = self._wire, None
        if wire is not None and wire.transport is not None:
            wire.transport.abort()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.shield(wire.lost)

    async def _reconnect(self, sink: PipelinedSink, stop: threading.Event) -> None:
        """Reconnect with exponential backoff and jitter until it works or `stop` is set."""
        self._connected = False
        await self._drop()
        # Acks of the closed connection are void (a packet id means nothing on another one).
        # Its messages stay held: the broker resends only those whose expiry has not passed.
        sink.drop_tokens(lambda _token: False)
        backoff = Backoff()
        while not stop.is_set():
            if not self._room_for_a_connection(sink):
                self._hooks.tick()
                await _sleep(max(self.stall.seconds_left(), 0.1), stop)
                continue
            try:
                await self._connect(sink, self.filters)
            except (OSError, BrokerError) as exc:
                delay = backoff.next()
                log.warning(
                    "broker %s unreachable (%s); retrying in %.1fs",
                    self.session.address,
                    exc,
                    delay,
                )
                self._hooks.tick()  # operations and bookkeeping go on while the broker is away
                await _sleep(delay, stop)
                continue
            log.info("reconnected to %s", self.session.address)
            return

    def _room_for_a_connection(self, sink: PipelinedSink) -> bool:
        """Whether the sink can take the window a new connection brings (retrying storage first).

        Held copies are never dropped, so during a storage stall each connection may add one
        broker window to them; connecting only while there is room keeps what is held bounded.
        """
        if not sink.can_hold() and self.stall.seconds_left() == 0 and not self._held:
            try:
                _commit_now(sink)
            except StorageUnavailable as exc:
                self.stall.failed(exc)
            else:
                self.stall.cleared()
        return sink.can_hold()

    async def _shutdown(self, sink: PipelinedSink) -> None:
        """Stop reading, store what is pending, send its acks, disconnect, let the broker close."""
        wire = self._wire
        if not self._connected or wire is None or wire.failure is not None:
            self._connected = False
            await self._drop()
            # Keep what was received on the lost connection: storing it twice is safe.
            try:
                _commit_now(sink)
            except StorageUnavailable as exc:
                log.warning("storage still failing while disconnected: %s", exc.detail)
            return
        wire.pause()
        try:
            _commit_now(sink)
        except StorageUnavailable as exc:
            log.error(
                "could not store %d pending messages at shutdown (not acknowledged: the "
                "broker resends those that have not expired): %s",
                sink.pending,
                exc.detail,
            )
        self._connected = False  # a disconnect we asked for is not a lost connection
        self._announce(wire, online=False)  # a clean DISCONNECT discards the will
        wire.write(_DISCONNECT)
        wire.failure = BrokerUnreachable("disconnected")  # what is read from now on is dropped
        assert wire.transport is not None
        _close_after_the_broker(wire.transport)
        wire.resume()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.shield(wire.lost)
        except TimeoutError:
            wire.transport.abort()
        self._wire = None


def _close_after_the_broker(transport: asyncio.Transport) -> None:
    """Half-close after the buffered acks and the DISCONNECT; the broker closes the rest.

    Closing a socket with unread data in it makes the kernel send a reset, and the broker then
    discards the acknowledgements it had not read yet: they come again as duplicates. So the
    write side ends with a FIN (after what is buffered), reading goes on (what arrives is
    dropped: unacknowledged, the broker sends it again), and the broker's close ends it. TLS
    cannot half-close: there the transport closes, as before.
    """
    if transport.can_write_eof():
        transport.write_eof()
    else:
        transport.close()


def _commit_now(sink: PipelinedSink) -> int:
    """Commit on the loop: the commit in flight first, then a fresh try at everything held.

    StorageUnavailable when that try fails; a commit in flight that failed just holds again.
    """
    with contextlib.suppress(StorageUnavailable):
        sink.settle()
    return sink.commit()


async def _sleep(seconds: float, stop: threading.Event) -> None:
    """Sleep, but wake within a tick when `stop` is set (a threading event: polled)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while not stop.is_set() and (left := until - loop.time()) > 0:
        await asyncio.sleep(min(left, TICK_S))
