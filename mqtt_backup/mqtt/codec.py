"""An asyncio MQTT client on the sans-IO codec `mqtt5`, with flow control left to its user.

Incoming QoS 1 messages are acknowledged only when the consumer says it is done with them
(`ack`), all PUBACKs of a batch in one write. The broker may have at most `receive_max` of them
unacknowledged (the MQTT 5 Receive Maximum we send in CONNECT; on 3.1.1 the broker's own inflight
window), so a slow consumer slows the broker's sending instead of filling a queue here, and a
message is never acknowledged and then lost in this process.

One class for both protocol versions: MQTT 5 through `mqtt5`, 3.1.1 through the small codec in
`v311`, which reads and writes the same packet objects.

Outgoing QoS 1 publishes share one window, never larger than the broker's Receive Maximum from
CONNACK: `publish` for one message, `publish_many` for pre-encoded packets (`packets.Outgoing`)
written as many per write as the window has room for.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import mqtt5

from mqtt_backup.config import BrokerAddress, BrokerTarget
from mqtt_backup.errors import BrokerError, BrokerRefused, BrokerUnreachable
from mqtt_backup.mqtt import v311
from mqtt_backup.mqtt.packets import PACKET_ID, Outgoing, read5
from mqtt_backup.mqtt.session import CONNECT_TIMEOUT_S, describe, no_answer, tls_context
from mqtt_backup.mqtt.values import Delivery
from mqtt_backup.records import Properties

DEFAULT_RECEIVE_MAX = 256
CLOSE_TIMEOUT_S = 5.0
_MAX_PACKET_ID = 0xFFFF

Reader = Callable[[memoryview], tuple[mqtt5.Packet, int]]
Writer = Callable[[mqtt5.Packet], bytes]
# Called with the PUBACK's reason code, or CONNECTION_LOST when none will come.
Acked = Callable[[int], None]
CONNECTION_LOST = -1
_PUBACK = 0x40
_NO_PROPERTIES = Properties()  # what a publish without properties, or on MQTT 3.1.1, sends


# A PUBACK with reason Success from its packet id: the 4 bytes both codecs write for it.
_PUBACK_HEAD = _PUBACK << 8 | 2  # remaining length 2: the packet id alone
_puback = struct.Struct(">HH").pack


def _write5(packet: mqtt5.Packet) -> bytes:
    return packet.write()


def _delivery(packet: mqtt5.PublishPacket) -> Delivery:
    return Delivery(
        topic=packet.topic,
        payload=packet.payload,
        qos=int(packet.qos),
        retain=packet.retain,
        dup=packet.duplicate,
        packet_id=packet.packet_id if packet.qos else None,
        response_topic=packet.response_topic,
        correlation_data=packet.correlation_data,
        user=tuple(packet.user_properties),
        content_type=packet.content_type,
        payload_format=packet.payload_format_indicator,
        message_expiry=packet.message_expiry_interval,
    )


class SendWindow:
    """QoS 1 publishes awaiting their PUBACK, at most `size`.

    Credits are taken in turn, first come first served, and given back as PUBACKs arrive.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self.peak = 0
        self.failure: BrokerError | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._wake_pending = False

    async def take(self, most: int) -> int:
        """Wait for room; take up to `most` credits (at least one). The failure once closed."""
        queued = bool(self._waiters)  # behind those already waiting
        while self.failure is None and (self.free == 0 or queued):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif self.free:
                    self._wake()  # woken, then cancelled: the next in line may take it
                raise
            queued = False
        if self.failure is not None:
            raise self.failure
        granted = min(most, self.free)
        self.free -= granted
        self.peak = max(self.peak, self.size - self.free)
        if self.free and self._waiters:
            self._wake()
        return granted

    def grab(self, most: int) -> int:
        """Take up to `most` credits now, without waiting (the ready queue's refill); `keep`."""
        granted = min(most, self.free)
        self.free -= granted
        return granted

    def keep(self, unused: int) -> None:
        """After a `grab`: give back the credits not used (QoS 0 needs none); note the peak."""
        self.free += unused
        self.peak = max(self.peak, self.size - self.free)

    def give(self, count: int = 1) -> None:
        """Credits back; whoever waits is woken once the current batch of PUBACKs is read."""
        self.free += count
        if self._waiters and not self._wake_pending:
            # Woken later, not now: one wake-up takes all the room a read freed, so the next
            # write carries many packets instead of one.
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_pending = False
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self, failure: BrokerError) -> None:
        """The connection is gone: every waiter raises `failure`."""
        self.failure = failure
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


@dataclass(eq=False, slots=True)
class _Ready:
    """One stream's pre-encoded publishes that wait for room in the window, in order."""

    acked: Acked
    packets: deque[Outgoing]
    ahead: int = 0
    # The stream's publish_many, waiting until at most `ahead` of its packets are unwritten.
    waiter: asyncio.Future[None] | None = None

    def settle(self, failure: BrokerError | None = None) -> None:
        """Wake the stream's publish_many when its packets are written (or can never be)."""
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if failure is not None:
            waiter.set_exception(failure)
            waiter.exception()  # retrieved: its task may be cancelled meanwhile
            self.waiter = None
        elif len(self.packets) <= self.ahead:
            waiter.set_result(None)
            self.waiter = None


def _qos0_next(stream: _Ready) -> bool:
    """The stream's next packet is QoS 0: it goes out with no room in the window."""
    return bool(stream.packets) and not stream.packets[0].qos


class _Wire(asyncio.Protocol):
    """Bytes in and out of one connection: parses packets, hands them on, keeps the inbox."""

    def __init__(self, read: Reader, inbox_limit: int, mqtt5_on: bool = True) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._read = read
        self._mqtt5 = mqtt5_on
        self._next_id = 0
        # Streams of pre-encoded publishes waiting for room, taking turns (`publish_many`).
        self.ready: deque[_Ready] = deque()
        self.queues: dict[Acked, _Ready] = {}
        self._buffer = bytearray()
        self._inbox_limit = inbox_limit
        self.transport: asyncio.Transport | None = None
        self._socket: socket.socket | None = None
        self.connack: asyncio.Future[mqtt5.ConnAckPacket] = loop.create_future()
        self.answers: dict[int, asyncio.Future[mqtt5.Packet]] = {}
        self.acks: dict[int, Acked] = {}  # pre-encoded publishes awaiting their PUBACK
        self.window = SendWindow(1)
        self.inbox: deque[Delivery] = deque()
        self.arrived = asyncio.Event()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.failure: BrokerError | None = None
        self.paused = False
        self.heard_at = loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (asyncio hands a Transport to a stream Protocol)."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._socket = transport.get_extra_info("socket")
        _ack_at_once(self._socket)

    def data_received(self, data: bytes) -> None:
        """Parse every whole packet; keep the rest for the next call; refill the window."""
        if self.failure is not None:
            return
        # The loop kept, not looked up: get_running_loop() is a getpid() system call per read.
        self.heard_at = self._loop.time()
        self._buffer += data
        buffer, acks = self._buffer, self.acks
        offset, end, freed = 0, len(buffer), 0
        with memoryview(buffer) as view:
            while offset < end:
                # A successful PUBACK of a pre-encoded publish (remaining length 2: reason 0),
                # most of what a restore connection reads: handled without the codec.
                if buffer[offset] == _PUBACK and offset + 4 <= end and buffer[offset + 1] == 2:
                    acked = acks.pop(buffer[offset + 2] << 8 | buffer[offset + 3], None)
                    if acked is not None:
                        acked(0)
                        freed += 1
                        offset += 4
                        continue
                try:
                    packet, size = self._read(view[offset:])
                except IndexError:  # only part of the next packet so far
                    break
                except ValueError as exc:
                    self.fail(BrokerError(f"malformed packet from the broker: {exc}"))
                    return
                offset += size
                self._dispatch(packet)
        del buffer[:offset]
        if freed:
            self.window.give(freed)
        # The room these PUBACKs freed is filled now, in one write, not after a task wake-up:
        # with 20 publishes in flight, each round trip's latency is the rate. That write
        # carries the ACK of what was read; only without one is the ACK sent at once (a
        # setsockopt and a bare ACK segment per read were a tenth of a restore's CPU).
        if not (self.ready and self.refill()):
            _ack_at_once(self._socket)
        if self.inbox:
            self.arrived.set()
            if len(self.inbox) >= self._inbox_limit and not self.paused and self.transport:
                # Only QoS 0 can get here (the broker keeps QoS 1 within our Receive Maximum).
                self.transport.pause_reading()
                self.paused = True

    def next_packet_id(self) -> int:
        """A packet id no publish or request of this connection is waiting on."""
        for _ in range(_MAX_PACKET_ID):
            self._next_id = self._next_id % _MAX_PACKET_ID + 1
            if self._next_id not in self.answers and self._next_id not in self.acks:
                return self._next_id
        raise BrokerError("no free packet id")  # cannot happen within the Receive Maximum

    def refill(self) -> bool:
        """Write what the window has room for from the ready streams, one write in all.

        Each stream in turn takes all the room there is (so a write carries many packets),
        then goes to the back of the line if it has more. True when a write went out whole
        (it carried the ACK of what was read).
        """
        window, ready, acks, mqtt5_on = self.window, self.ready, self.acks, self._mqtt5
        transport = self.transport
        if transport is None or self.failure is not None:
            return False
        parts: list[bytes] = []
        done: list[Acked] = []  # QoS 0: no PUBACK will come, written is done
        answers, packet_id = self.answers, self._next_id
        while ready and (window.free or _qos0_next(ready[0])):
            stream = ready[0]
            packets, acked = stream.packets, stream.acked
            room = window.grab(len(packets))
            while packets and (room or not packets[0].qos):
                packet = packets.popleft()
                if not packet.qos:
                    # No credit, no packet id, no acks entry: nothing would ever give them back.
                    parts.extend(packet.parts(None, mqtt5_on))
                    done.append(acked)
                    continue
                room -= 1
                # next_packet_id, inlined: this loop runs once per restored message.
                packet_id = packet_id % _MAX_PACKET_ID + 1
                if packet_id in acks or packet_id in answers:
                    self._next_id = packet_id
                    packet_id = self.next_packet_id()  # a bounded search, or BrokerError
                acks[packet_id] = acked
                encoded = packet.encoded
                if encoded is not None and mqtt5_on:  # Outgoing.parts, inlined
                    parts += (encoded[0], PACKET_ID(packet_id), encoded[1], packet.payload)
                else:
                    parts.extend(packet.parts(packet_id, mqtt5_on))
            window.keep(room)
            self._next_id = packet_id
            ready.popleft()
            if packets:
                ready.append(stream)
            else:
                del self.queues[stream.acked]
            stream.settle()
        if parts:
            transport.write(b"".join(parts))
        for acked in done:
            acked(0)
        return bool(parts) and not transport.get_write_buffer_size()

    def withdraw(self, acked: Acked) -> int:
        """Drop a stream's unwritten publishes (it was abandoned); returns how many."""
        stream = self.queues.pop(acked, None)
        if stream is None:
            return 0
        self.ready.remove(stream)
        dropped = len(stream.packets)
        stream.packets.clear()
        stream.settle(BrokerUnreachable("the stream was withdrawn"))
        return dropped

    def _dispatch(self, packet: mqtt5.Packet) -> None:
        match packet:
            case mqtt5.PublishPacket():
                self.inbox.append(_delivery(packet))
            case mqtt5.PubAckPacket() if packet.packet_id in self.acks:
                self.acks.pop(packet.packet_id)(int(packet.reason_code))
                self.window.give()
            case mqtt5.PubAckPacket() | mqtt5.SubAckPacket():
                waiter = self.answers.pop(packet.packet_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(packet)
            case mqtt5.ConnAckPacket():
                if not self.connack.done():
                    self.connack.set_result(packet)
            case mqtt5.DisconnectPacket():
                reason = packet.reason_str or packet.reason_code.name
                self.fail(BrokerUnreachable(f"the broker closed the connection: {reason}"))
            case mqtt5.PingRespPacket():
                pass
            case _:
                self.fail(BrokerError(f"unexpected {type(packet).__name__} from the broker"))

    def take(self, max_count: int) -> list[Delivery]:
        """Up to `max_count` deliveries from the inbox; reading resumes when it has room."""
        batch = [self.inbox.popleft() for _ in range(min(max_count, len(self.inbox)))]
        if not self.inbox:
            self.arrived.clear()
        if self.paused and len(self.inbox) < self._inbox_limit // 2 and self.transport:
            self.transport.resume_reading()
            self.paused = False
        return batch

    def connection_lost(self, exc: Exception | None) -> None:
        """The first reason wins; everyone waiting learns it."""
        self.fail(lost_connection(exc))
        if not self.lost.done():
            self.lost.set_result(None)

    def fail(self, error: BrokerError) -> None:
        """End the connection with `error`: waiters raise it, the transport closes."""
        if self.failure is None:
            self.failure = error
        waiters: list[asyncio.Future[Any]] = [self.connack, *self.answers.values()]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(self.failure)
                waiter.exception()  # retrieved: nobody may be waiting for it any more
        self.answers.clear()
        acks, self.acks = self.acks, {}
        for acked in acks.values():
            acked(CONNECTION_LOST)
        # Publishes not written yet will never be: their streams hear it the same way.
        ready, self.queues = self.ready, {}
        self.ready = deque()
        for stream in ready:
            for _ in stream.packets:
                stream.acked(CONNECTION_LOST)
            stream.packets.clear()
            stream.settle(self.failure)
        self.window.close(self.failure)
        self.arrived.set()
        if self.transport is not None:
            self.transport.close()


class CodecConnection:
    """`async with CodecConnection(target, ...) as conn:` one MQTT client on the running loop.

    BrokerUnreachable when the broker cannot be reached or the connection drops, BrokerRefused
    when it says no (CONNACK, SUBACK or PUBACK reason codes), each with a hint.
    """

    def __init__(
        self,
        target: BrokerTarget,
        client_id: str | None = None,
        *,
        keepalive: int = 30,
        receive_max: int = DEFAULT_RECEIVE_MAX,
        session_expiry: int | None = None,
    ) -> None:
        """`session_expiry` (s): resume and keep a broker session; None: a fresh one."""
        if not 0 < receive_max <= _MAX_PACKET_ID:
            raise ValueError("receive_max must be 1..65535")
        self.address = target.address
        self.client_id = client_id or f"mqtt-backup-{uuid.uuid4().hex[:12]}"
        self.mqtt5 = target.mqtt5
        self.tls_files = target.tls_files
        self.keepalive = keepalive
        self.receive_max = receive_max
        self.session_expiry = session_expiry
        self.session_present = False
        # At most this many QoS 1 publishes awaiting their PUBACK (set before connecting), and
        # never more than the broker's Receive Maximum.
        self.send_window = _MAX_PACKET_ID
        # The broker's Maximum Packet Size (MQTT 5 CONNACK); None: no limit was given.
        self.max_packet_size: int | None = None
        self._read: Reader = read5 if self.mqtt5 else v311.read
        self._write: Writer = _write5 if self.mqtt5 else v311.write
        self._wire: _Wire | None = None
        self._pinger: asyncio.Task[None] | None = None

    # ---- connecting ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Connect and wait for a positive CONNACK."""
        loop = asyncio.get_running_loop()
        limit = 2 * self.receive_max
        try:
            # Not `asyncio.wait_for`: on 3.11 it can swallow a cancellation (cpython gh-86296).
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, wire = await loop.create_connection(
                    lambda: _Wire(self._read, limit, self.mqtt5),
                    self.address.host,
                    self.address.port,
                    ssl=self._ssl_context(),
                    server_hostname=self.address.host if self.address.tls else None,
                )
        except TimeoutError:
            raise BrokerUnreachable(
                f"{self.address}: no connection within {CONNECT_TIMEOUT_S:g} s",
                "check --broker and that the broker runs",
            ) from None
        except OSError as exc:  # ssl.SSLError (e.g. certificate verify failed) included
            tls = isinstance(exc, ssl.SSLError)
            hint = "check --ca" if tls else "check --broker and that the broker runs"
            raise BrokerUnreachable(f"{self.address}: {describe(exc)}", hint) from exc
        self._wire = wire
        try:
            await self._handshake(wire)
        except BaseException:
            self._abort()
            raise
        if self.keepalive > 0:
            self._pinger = asyncio.create_task(self._keep_alive(wire), name="mqtt.keep_alive")
        return self

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.address.tls:
            return None
        return tls_context(self.tls_files)

    async def _handshake(self, wire: _Wire) -> None:
        password = self.address.password
        self._send(
            mqtt5.ConnectPacket(
                self.client_id,
                username=self.address.username,
                password=password.encode("utf-8") if password is not None else None,
                clean_start=self.session_expiry is None,
                keep_alive=self.keepalive,
                session_expiry_interval=self.session_expiry or 0,
                receive_max=self.receive_max,
            )
        )
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                connack = await wire.connack
        except TimeoutError:
            raise no_answer(self.address, "CONNACK") from None
        except BrokerError as exc:
            raise _not_mqtt(self.address, self.mqtt5, exc) from exc
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            raise _refused(self.address, connack)
        self.session_present = connack.session_present
        # The broker's Receive Maximum bounds our QoS 1 publishes awaiting their PUBACK.
        receive_max = connack.receive_max if self.mqtt5 else _MAX_PACKET_ID
        wire.window = SendWindow(max(1, min(receive_max, self.send_window)))
        if self.mqtt5:
            self.max_packet_size = connack.max_packet_size

    @property
    def window(self) -> SendWindow:
        """The window of QoS 1 publishes awaiting their PUBACK (shared by every publisher)."""
        return self._live().window

    # ---- running -----------------------------------------------------------------------------

    def _live(self) -> _Wire:
        wire = self._wire
        if wire is None:
            raise BrokerUnreachable(f"{self.address}: not connected")
        if wire.failure is not None:
            raise wire.failure
        return wire

    def _send(self, *packets: mqtt5.Packet) -> None:
        wire = self._live()
        assert wire.transport is not None
        wire.transport.write(b"".join(self._write(p) for p in packets))

    async def _request(self, packet_for: Callable[[int], mqtt5.Packet]) -> mqtt5.Packet:
        wire = self._live()
        packet_id = wire.next_packet_id()
        waiter: asyncio.Future[mqtt5.Packet] = asyncio.get_running_loop().create_future()
        wire.answers[packet_id] = waiter
        self._send(packet_for(packet_id))
        return await waiter

    async def subscribe(
        self,
        filters: Sequence[str],
        qos: int = 1,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 1,
    ) -> None:
        """Subscribe; BrokerRefused naming the filters the broker refused.

        MQTT 5 options: retain handling 1 (default) sends retained messages only for a new
        subscription. No-local must stay off on `$share/...` filters (MQTT-3.8.3-4).
        """
        options = [
            mqtt5.TopicFilter(
                f,
                max_qos=mqtt5.QoS(qos),
                no_local=no_local,
                retain_as_published=retain_as_published,
                retain_handling=mqtt5.RetainHandling(retain_handling),
            )
            for f in filters
        ]
        suback = await self._request(lambda pid: mqtt5.SubscribePacket(pid, options))
        assert isinstance(suback, mqtt5.SubAckPacket)
        refused = [
            f"{f} ({code.name})"
            for f, code in zip(filters, suback.reason_codes, strict=False)
            if int(code) >= 128
        ]
        if refused or len(suback.reason_codes) != len(filters):
            raise BrokerRefused(
                f"subscription to {', '.join(refused or filters)} refused",
                "check the broker's ACL for this user",
            )

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        props: Properties | None = None,
    ) -> None:
        """Publish; at QoS 1 wait for the PUBACK (BrokerRefused on a failure reason code)."""

        def packet(packet_id: int | None) -> mqtt5.PublishPacket:
            return self._publish_packet(topic, payload, qos, retain, props, packet_id)

        if qos == 0:
            self._send(packet(None))
            return
        window = self._live().window
        await window.take(1)
        try:
            puback = await self._request(packet)
        finally:
            window.give()
        assert isinstance(puback, mqtt5.PubAckPacket)
        if int(puback.reason_code) >= 128:
            raise BrokerRefused(
                f"publish to {topic} refused ({puback.reason_code.name})",
                "check the broker's ACL for this user",
            )

    def _publish_packet(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        props: Properties | None,
        packet_id: int | None,
    ) -> mqtt5.PublishPacket:
        p = props if props is not None and self.mqtt5 else _NO_PROPERTIES
        return mqtt5.PublishPacket(
            topic,
            payload,
            qos=mqtt5.QoS(qos),
            retain=retain,
            packet_id=packet_id,
            payload_format_indicator=p.payload_format or 0,
            message_expiry_interval=p.message_expiry,
            content_type=p.content_type,
            response_topic=p.response_topic,
            correlation_data=p.correlation_data,
            user_properties=list(p.user),
        )

    async def publish_many(
        self, packets: Sequence[Outgoing], acked: Acked, *, ahead: int = 0
    ) -> None:
        """Queue `packets` in order; they are written as the window has room.

        A QoS 0 packet (a replay keeps the stored QoS) takes no room and no packet id: it is
        done, `acked(0)`, once written.

        The stream is `acked`, called once per packet with its PUBACK's reason code, or with
        CONNECTION_LOST when the connection goes first (written or not); one call at a time per
        stream. Returns once at most `ahead` of the stream's packets are unwritten: a stream
        that queues its next packets while the last ones wait keeps the window full, because
        each read of PUBACKs refills it from the queue at once. BrokerUnreachable when the
        connection is gone.
        """
        wire = self._live()
        stream = wire.queues.get(acked)
        if stream is None:
            stream = wire.queues[acked] = _Ready(acked, deque(), ahead)
            wire.ready.append(stream)
        if stream.waiter is not None:
            raise RuntimeError("publish_many: one call at a time per stream (`acked`)")
        stream.ahead = ahead
        stream.packets.extend(packets)
        wire.refill()
        if len(stream.packets) <= ahead:
            return
        waiter = stream.waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            wire.withdraw(acked)  # abandoned: what is unwritten never goes out
            raise

    @property
    def queued(self) -> int:
        """Publishes handed to `publish_many` and not yet written, over every stream."""
        wire = self._wire
        return sum(len(s.packets) for s in wire.ready) if wire is not None else 0

    def withdraw(self, acked: Acked) -> None:
        """Drop the unwritten publishes of the stream `acked` (abandoned); no callbacks."""
        if self._wire is not None:
            self._wire.withdraw(acked)

    async def receive(self, max_count: int | None = None) -> list[Delivery]:
        """Wait for incoming messages; return up to `max_count` (default: half the window).

        Taking half of the Receive Maximum at a time, the broker can send the next half while
        the consumer works on this one. What arrived before the connection dropped is handed
        out first; then BrokerUnreachable.
        """
        wire = self._wire
        if wire is None:
            raise BrokerUnreachable(f"{self.address}: not connected")
        while not wire.inbox:
            if wire.failure is not None:
                raise wire.failure
            await wire.arrived.wait()
        return wire.take(max_count or max(1, self.receive_max // 2))

    def ack(self, deliveries: Iterable[Delivery]) -> None:
        """Acknowledge processed QoS 1 deliveries: all their PUBACKs in one write.

        Nothing to do once the connection is gone: the broker keeps what was not acknowledged
        (a persistent session sends it again; a clean one drops it with the session).
        """
        wire = self._wire
        if wire is None or wire.failure is not None:
            return
        # PUBACK, reason Success: 4 bytes on both protocols, what the codec's would write. Not
        # a packet object per message: the restore client acks every message it restores.
        head = _PUBACK_HEAD
        acks = b"".join([_puback(head, d.packet_id) for d in deliveries if d.packet_id is not None])
        if acks and wire.transport is not None:
            wire.transport.write(acks)

    async def _keep_alive(self, wire: _Wire) -> None:
        """PINGREQ every half keepalive; no word from the broker for a whole one ends it."""
        loop = asyncio.get_running_loop()
        interval = self.keepalive / 2
        while wire.failure is None:
            await asyncio.sleep(interval)
            # While reading is paused the broker's answers wait in the socket: no verdict then.
            silent = loop.time() - wire.heard_at
            if not wire.paused and silent > self.keepalive + interval:
                wire.fail(BrokerUnreachable(f"{self.address}: no answer for {silent:.0f} s"))
                return
            with contextlib.suppress(BrokerError):
                self._send(mqtt5.PingReqPacket())

    # ---- closing ---------------------------------------------------------------------------

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """DISCONNECT and wait until the broker has the socket closed (quietly when gone)."""
        wire, self._wire = self._wire, None
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        if wire is None or wire.transport is None:
            return
        if wire.failure is None:
            wire.transport.write(self._write(mqtt5.DisconnectPacket()))
            wire.failure = BrokerUnreachable(f"{self.address}: disconnected")
            wire.transport.close()  # after the buffered bytes are written
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.shield(wire.lost)
        except TimeoutError:
            wire.transport.abort()

    def _abort(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None and wire.transport is not None:
            wire.transport.abort()


_CONNACK_HINTS = {
    int(mqtt5.ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD): "check the user name and password",
    int(mqtt5.ConnAckReasonCode.NOT_AUTHORIZED): "check the user name and password",
    int(mqtt5.ConnAckReasonCode.CLIENT_ID_NOT_VALID): "use another client id",
    int(mqtt5.ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION): "try --protocol 3.1.1",
    int(mqtt5.ConnAckReasonCode.SERVER_UNAVAILABLE): "try again when the broker is back",
    int(mqtt5.ConnAckReasonCode.SERVER_BUSY): "try again later",
    int(mqtt5.ConnAckReasonCode.CONNECTION_RATE_EXCEEDED): "try again later",
    int(mqtt5.ConnAckReasonCode.BANNED): "ask the broker's operator",
}


def _ack_at_once(sock: socket.socket | None) -> None:
    """Acknowledge what arrives at once (Linux TCP_QUICKACK, which the kernel clears again).

    A stock Mosquitto sends with Nagle's algorithm on (`set_tcp_nodelay false`): a small packet
    behind an unacknowledged one waits for our ACK, which the kernel delays by up to 40 ms. That
    was most of a small restore's time to its first answer.
    """
    if sock is not None and _QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _refused(address: BrokerAddress, connack: mqtt5.ConnAckPacket) -> BrokerRefused:
    code = connack.reason_code
    detail = f"{address}: {code.name.lower().replace('_', ' ')}"
    if connack.reason_str:
        detail += f" ({connack.reason_str})"
    if connack.server_reference:
        return BrokerRefused(detail, f"connect to {connack.server_reference} instead")
    return BrokerRefused(detail, _CONNACK_HINTS.get(int(code), "look at the broker's log"))


_LOST = "connection lost: "
_CLOSED = "the broker closed the connection"


def lost_connection(exc: Exception | None) -> BrokerUnreachable:
    """The error of a connection that ended without a DISCONNECT; `exc` (if any) is its cause."""
    error = BrokerUnreachable(f"{_LOST}{describe(exc)}" if exc else _CLOSED)
    error.__cause__ = exc
    return error


def _not_mqtt(address: BrokerAddress, mqtt5_on: bool, exc: BrokerError) -> BrokerError:
    """No usable CONNACK: a broker without MQTT 5, or one that dropped the connection first."""
    if mqtt5_on and exc.detail.startswith("malformed packet"):
        return BrokerRefused(
            f"{address} did not answer in MQTT 5 ({exc.detail})", "try --protocol 3.1.1"
        )
    if exc.detail.startswith(_LOST) or exc.detail == _CLOSED:
        reason = exc.detail.removeprefix(_LOST)
        return BrokerUnreachable(
            f"{address} closed the connection before its CONNACK ({reason})",
            _dropped_hint(address, exc.__cause__),
        )
    return exc


def _dropped_hint(address: BrokerAddress, cause: BaseException | None) -> str:
    """Why a broker drops a connection before answering: mostly TLS on one side only."""
    if isinstance(cause, ssl.SSLError) and "CERTIFICATE_REQUIRED" in (cause.reason or ""):
        return "the broker requires a client certificate: give --cert and --key"
    if address.tls:
        # A listener that requires a client certificate may reset the socket before its alert.
        return (
            "check --cert and --key (a listener may require a client certificate) and the "
            "broker's log"
        )
    return "check --broker (a TLS listener needs mqtts://) and the broker's log"
