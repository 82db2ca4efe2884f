"""The MQTT 5 ingest transport on asyncio and the sans-IO codec `mqtt5`.

`AsyncIngest` does what `PahoIngest` does (persistent session, QoS 1, acks only after the synced
write, reconnect with backoff, hold while storage fails) with the work per message cut to what
the codec gives: every whole packet of a `data_received` call is parsed and offered to the commit
pipeline, and when the socket has nothing more to read the batch goes to a worker thread for its
synced writes. The loop goes on reading meanwhile; when the commit returns, all PUBACKs of its
batch leave in one `transport.write` and what arrived in between is committed next (one commit in
flight: under load the group commit grows by itself).

All of that but the wire (the commit in flight, the hold path, `hold` / `commit_held` /
`settled` for the bridge's operations, reconnect and shutdown, `connect` and `run` on the loop of
its own that also runs the bridge's restore and control socket) is `loop_ingest.LoopIngest`'s,
shared with `PahoIngest`; this module is the wire: the Protocol `_Wire`, the handshake, keepalive,
PUBACKs, the half-close at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import threading
import time
from collections.abc import Sequence
from typing import TypeVar, cast

import mqtt5

from mqtt_backup.errors import (
    BrokerError,
    BrokerRefused,
    BrokerUnreachable,
    ConfigError,
    SessionTakenOver,
)
from mqtt_backup.mqtt.codec import _not_mqtt, _refused, lost_connection
from mqtt_backup.mqtt.loop_ingest import TICK_S, LoopIngest, PipelinedSink
from mqtt_backup.mqtt.packets import read5
from mqtt_backup.mqtt.session import (
    CONNECT_TIMEOUT_S,
    REPLAY_PROPERTY,
    SESSION_TAKEN_OVER,
    Hooks,
    Session,
    describe,
    no_answer,
    taken_over,
    tls_context,
)
from mqtt_backup.records import Properties, Record, stored_flags

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0
# asyncio reads at most 256 KiB at a time; a shorter read means the socket was empty.
DRAINED_BELOW_BYTES = 64 * 1024
_PUBLISH = mqtt5.PublishPacket
_PINGREQ = mqtt5.PingReqPacket().write()
_DISCONNECT = mqtt5.DisconnectPacket().write()
# Our own packet ids: SUBSCRIBE 1, UNSUBSCRIBE 2, the status publishes (online, offline) 3 and 4.
_ONLINE_ID, _OFFLINE_ID = 3, 4
_T = TypeVar("_T")


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

    def quiet(self) -> bool:
        """Whether a tick went by with nothing read."""
        return asyncio.get_running_loop().time() - self.heard_at >= TICK_S

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


class AsyncIngest(LoopIngest):
    """Ingest transport on asyncio + `mqtt5`: MQTT 5, persistent session, acks after the sync."""

    def __init__(self, session: Session, filters: Sequence[str], hooks: Hooks) -> None:
        if not session.target.mqtt5:
            raise ConfigError(
                "the asyncio transport speaks MQTT 5 only",
                "use --transport paho with --protocol 3.1.1",
            )
        super().__init__(session, filters, hooks)
        self._ssl = self._ssl_context()
        self._generation = 0  # the low 16 bits of the sink's number of the open connection
        self._wire: _Wire | None = None

    @property
    def paused(self) -> bool:
        """Whether reading is paused (storage fails and the hold is full)."""
        return self._wire is not None and self._wire.paused

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.session.address.tls:
            return None
        return tls_context(self.session.target.tls_files)

    # ---- connecting ----------------------------------------------------------------------------

    def _reading(self) -> _Wire | None:
        wire = self._wire
        return wire if wire is not None and wire.serving and wire.failure is None else None

    async def _first_connect(self, sink: PipelinedSink, known_filters: Sequence[str]) -> bool:
        """MQTT 5 subscribes every filter each time (retain handling 1 re-sends nothing).

        `known_filters` no longer configured go.
        """
        return await self._connect(sink, known_filters, first=True)

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
        self._announce(online=True)
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

    def _announce(self, online: bool) -> None:
        """Publish the retained status (QoS 1; its PUBACK is only looked at for a refusal)."""
        presence, wire = self.session.presence, self._wire
        if presence is not None and wire is not None:
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
            raise no_answer(self.session.address, what) from None
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
            self._housekeeping(wire)
            self._hooks.tick()

    def _housekeeping(self, wire: _Wire) -> None:
        """Between reads: the commit path's (`_between_reads`), ping, notice a silent broker."""
        self._between_reads(wire)
        now = asyncio.get_running_loop().time()
        keepalive = self.session.keepalive
        asked = wire.unanswered_since
        # Only a PINGREQ left unanswered for a keepalive condemns the broker (silence alone may
        # be ours: a long commit). While reading is paused its answers wait in the socket.
        if asked is not None and not wire.paused and now - asked > keepalive:
            silent = now - wire.heard_at
            wire.fail(BrokerUnreachable(f"no answer from the broker for {silent:.0f} s"))
        elif now - wire.pinged_at >= keepalive / 2:
            self._ping(wire, now)

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

    async def _drop(self) -> None:
        """Close the connection at once and let its socket go."""
        wire, self._wire = self._wire, None
        if wire is not None and wire.transport is not None:
            wire.transport.abort()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.shield(wire.lost)

    async def _goodbye(self) -> None:
        """Offline status, DISCONNECT, half-close; what comes is dropped until the broker closes."""
        wire = self._wire
        assert wire is not None
        self._announce(online=False)  # a clean DISCONNECT discards the will
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
