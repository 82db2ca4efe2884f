"""The ingest transport on paho-mqtt, driven by the bridge's asyncio loop.

`PahoIngest` is a paho client with a persistent session and manual acks, run through paho's
external-loop API: the socket is watched with `loop.add_reader` / `add_writer` (paho's
on_socket_open / on_socket_close / on_socket_register_write / on_socket_unregister_write),
`loop_misc` runs at every tick. The reader callback reads while the socket has data (a select
with timeout 0, plus `pending()` on TLS) and the batch has room: its end is "nothing more to
read", and the batch goes to a worker thread for its synced writes: the commit, hold, operation,
reconnect and shutdown paths are `loop_ingest.LoopIngest`'s, shared with the asyncio transport
(`async_ingest`). paho's connect (name lookup, TCP, the TLS handshake) blocks: it runs in a
worker thread too.

So the paho bridge is one loop as well: ingest, restore and the control socket are its tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqtt_backup.errors import (
    BrokerRefused,
    BrokerUnreachable,
    SessionTakenOver,
)
from mqtt_backup.mqtt.loop_ingest import TICK_S, LoopIngest, PipelinedSink
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
from mqtt_backup.records import Properties, Record

FLUSH_TIMEOUT_S = 5.0  # at shutdown: the acks, the status and the DISCONNECT
CLOSE_TIMEOUT_S = 5.0  # at shutdown, after the half-close: until the broker closes
_T = TypeVar("_T")
_SUCCESS = MQTTErrorCode.MQTT_ERR_SUCCESS
RECV_BYTES = 65536  # one read of the socket (paho's own reads are a packet piece each)
_PUBACK = struct.Struct(">BBH")  # type, remaining length 2, packet id: paho's PUBACK (no reason)


def _paho_properties(props: Any) -> Properties | None:
    if props is None:
        return None
    user = getattr(props, "UserProperty", None)
    result = Properties(
        payload_format=getattr(props, "PayloadFormatIndicator", None),
        message_expiry=getattr(props, "MessageExpiryInterval", None),
        content_type=getattr(props, "ContentType", None),
        response_topic=getattr(props, "ResponseTopic", None),
        correlation_data=getattr(props, "CorrelationData", None),
        user=tuple((str(k), str(v)) for k, v in user) if user else (),
    )
    return None if result.is_empty() else result


def _is_replay(props: Properties | None) -> bool:
    return props is not None and any(k == REPLAY_PROPERTY for k, _ in props.user)


class _Client(paho.Client):
    """paho's client, with the PUBLISH packets the bridge sees every time decoded by `take`.

    paho turns each PUBLISH into an `MQTTMessage`, on MQTT 5 with a `Properties` object (dozens
    of dict entries built per packet), and dispatches it through its topic matcher under two
    locks: two thirds of the transport's CPU on MQTT 5, half on 3.1.1 (docs/design-notes.md,
    "Where the paho transport's time went"). `take(header, body)` gets the packet paho framed
    (`_in_packet`) and says whether it took it; what it leaves (properties, QoS 2, anything
    odd) goes paho's way. `puback_all` queues a batch's PUBACKs as one packet of paho's output
    queue (paho's `ack` queues one each, and sends each in a syscall of its own).
    `_handle_publish`, `_in_packet` and `_packet_queue` are paho's internals (the same since
    1.x): tests/test_paho_publish.py pins them.
    """

    take: Callable[[int, bytearray], bool] | None = None
    # Read ahead (PahoIngest's loop, which asks `unread()`); paho's own loop selects on the
    # socket alone, so a client run by it must not hold bytes back.
    buffered = False
    _unread: bytearray | None = None  # read from the socket, not yet handed to paho

    def _sock_recv(self, bufsize: int) -> bytes:
        """What paho asks for, from one `recv` of up to RECV_BYTES when `buffered`.

        paho reads a packet with a `recv` per piece (its type byte, each byte of its length,
        then the rest): three system calls per PUBLISH at least. Bytes left over stay here, so
        `unread()` is part of "is there more to read" (`PahoIngest._readable`, a resume).
        """
        unread = self._unread
        if not unread:
            if not self.buffered:
                return super()._sock_recv(bufsize)
            data = super()._sock_recv(RECV_BYTES)  # BlockingIOError when empty, b"" at the end
            if len(data) <= bufsize:
                return data
            unread = self._unread = bytearray(data)
        piece = bytes(unread[:bufsize])
        del unread[:bufsize]  # cheap at the front of a bytearray
        return piece

    def unread(self) -> bool:
        """Whether bytes read from the socket wait here for paho."""
        return bool(self._unread)

    def _sock_close(self) -> None:
        self._unread = None  # what was left belongs to the connection that ends
        super()._sock_close()

    def _handle_publish(self) -> MQTTErrorCode:
        packet = self._in_packet
        if self.take is not None and self.take(packet["command"], packet["packet"]):
            return _SUCCESS
        return super()._handle_publish()

    def puback_all(self, mids: Sequence[int]) -> None:
        """PUBACKs for `mids` in this order, queued as one write (paho's `ack`: a `send` each)."""
        acks = b"".join([_PUBACK.pack(paho.PUBACK, 2, mid) for mid in mids])
        self._packet_queue(paho.PUBACK, acks, 0, 1)


class PahoIngest(LoopIngest):
    """Ingest transport on paho-mqtt: persistent session, QoS 1, manual acks after the sync."""

    def __init__(self, session: Session, filters: Sequence[str], hooks: Hooks) -> None:
        super().__init__(session, filters, hooks)
        self._generation = 0  # the sink's number of the open connection
        self._connack: tuple[bool, ReasonCode | None] | None = None
        self._suback: list[ReasonCode] | None = None
        self.taken_over: SessionTakenOver | None = None
        self._news: asyncio.Event | None = None  # a CONNACK, a SUBACK, a lost connection
        self._sock: socket.socket | None = None  # the socket the loop watches
        self._paused = False
        self._heard_at = 0.0  # monotonic: the last read
        self._publishes = 0  # PUBLISH packets paho handed over (a loop_read that read one)
        self._failure: BaseException | None = None  # raised inside a paho callback: a bug
        self._leaving = False  # the goodbye: the socket paho closes is kept and half-closed
        self._kept: socket.socket | None = None  # that socket, until the broker closes
        self._v5 = self._is_v5()
        self._client = self._make_client()

    def _make_client(self) -> _Client:
        v5 = self._v5
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.session.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        client.buffered = True  # this loop asks `unread()` before it waits for the socket
        addr = self.session.address
        if addr.username is not None:
            client.username_pw_set(addr.username, addr.password)
        if addr.tls:
            client.tls_set_context(tls_context(self.session.target.tls_files))
        presence = self.session.presence
        if presence is not None:
            client.will_set(presence.topic, presence.offline, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.take = self._take_publish
        client.on_disconnect = self._on_disconnect
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    @property
    def paused(self) -> bool:
        """Whether reading is paused (the hold is full)."""
        return self._paused

    # ---- paho callbacks (on the loop, inside loop_read / loop_write / loop_misc) -------------

    def _on_connect(
        self, _c: paho.Client, _u: object, flags: paho.ConnectFlags, rc: ReasonCode, _p: object
    ) -> None:
        self._connack = (flags.session_present, rc)
        self._wake()

    def _on_subscribe(
        self, _c: paho.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        self._suback = codes
        self._wake()

    def _on_disconnect(
        self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        if isinstance(rc, ReasonCode) and rc.value == SESSION_TAKEN_OVER:
            self.taken_over = taken_over(self.session.client_id)
        self._connection_lost(str(rc))

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        self._publishes += 1
        if self.sink is None:
            return
        props = _paho_properties(msg.properties)
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        record = Record(msg.topic, payload, msg.qos, bool(msg.retain), bool(msg.dup), props)
        token = (self._generation, msg.mid, msg.qos) if msg.qos else None
        self.sink.offer(record, token, _is_replay(props))

    def _take_publish(self, header: int, body: bytearray) -> bool:
        """A QoS 0/1 PUBLISH without properties, straight to the sink; False: paho decodes it.

        What `_on_message` makes of paho's message, without paho's objects: the same record.
        """
        qos = (header >> 1) & 3
        end = 2 + int.from_bytes(body[:2], "big")  # after the topic
        start = end + (2 if qos else 0) + (1 if self._v5 else 0)  # the payload's
        if qos > 1 or end == 2 or len(body) < start or (self._v5 and body[start - 1] != 0):
            return False  # QoS 2, no topic, too short, properties: paho's way (and its errors)
        try:
            topic = body[2:end].decode()
        except UnicodeDecodeError:
            return False
        self._publishes += 1
        sink = self.sink
        if sink is not None:
            record = Record(topic, bytes(body[start:]), qos, bool(header & 1), bool(header & 8))
            mid = int.from_bytes(body[end : end + 2], "big")
            sink.offer(record, (self._generation, mid, qos) if qos else None)
        return True

    # ---- the socket on the loop (paho's external-loop callbacks) ----------------------------
    #
    # paho's connect runs in a worker thread: what it calls there is left alone (the loop
    # stopped watching the old socket before, and watches the new one after).

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:  # no loop runs on this thread: paho's connect in a worker
            return False

    def _on_socket_open(self, _c: paho.Client, _u: object, sock: Any) -> None:
        if self._on_loop():
            self._watch(sock)

    def _on_socket_close(self, _c: paho.Client, _u: object, sock: Any) -> None:
        if self._on_loop():
            self._unwatch(sock)
            if self._leaving and self._kept is None:
                self._kept = _half_closed(sock)
            self._wake()

    def _on_socket_register_write(self, _c: paho.Client, _u: object, sock: Any) -> None:
        watched = self._watched(sock)
        if watched is not None and self._loop is not None:
            self._loop.add_writer(watched, self._on_writable)

    def _on_socket_unregister_write(self, _c: paho.Client, _u: object, sock: Any) -> None:
        watched = self._watched(sock)
        if watched is not None and self._loop is not None:
            self._loop.remove_writer(watched)

    def _watched(self, sock: object) -> socket.socket | None:
        """The socket the loop watches, if it is `sock` and this runs on the loop."""
        return self._sock if sock is self._sock and self._on_loop() else None

    def _watch(self, sock: socket.socket) -> None:
        assert self._loop is not None
        self._sock = sock
        self._paused = False
        self._heard_at = time.monotonic()
        self._loop.add_reader(sock, self._on_readable)
        if self._client.want_write():
            self._loop.add_writer(sock, self._on_writable)

    def _unwatch(self, sock: object) -> None:
        watched = self._sock
        if watched is None or sock is not watched:
            return
        self._sock = None
        if self._loop is not None and not self._loop.is_closed() and watched.fileno() >= 0:
            self._loop.remove_reader(watched)
            self._loop.remove_writer(watched)

    def _on_writable(self) -> None:
        self._client.loop_write()  # a failure closes the socket and calls on_disconnect

    def _on_readable(self) -> None:
        """Read while the socket has data and the batch has room; then commit (or hold) it.

        The end of these reads is DESIGN section 3's "nothing more to read": the batch closes.
        A `loop_read` reads one packet at most, and says success whether it read one or found
        the socket empty: after one that handed over a PUBLISH, the next read asks the socket
        itself (an empty one raises EAGAIN inside paho: one `recv`); only a read that handed
        over none is followed by the emptiness test (a select per packet cost more than that).
        """
        sink = self.sink
        if self._paused or self._sock is None or sink is None:
            return
        try:
            while True:
                publishes = self._publishes
                rc = self._client.loop_read()
                if rc != _SUCCESS:
                    self._connection_lost(paho.error_string(rc))
                    return
                if sink.full() or (self._publishes == publishes and not self._readable()):
                    break
        except Exception as exc:  # noqa: BLE001 - raised in a callback of ours: `run` raises it
            self._failure = exc
            self._wake()
            return
        self._heard_at = time.monotonic()
        if self._connected:
            self.commit_or_hold(self, drained_at=None if sink.full() else time.time_ns())
        if not self._paused and self._client.unread() and self._loop is not None:
            # As the socket's readiness would call again while it holds bytes (the handshake's
            # SUBACK may wait behind a full batch there): the buffer is read on, unless paused.
            self._loop.call_soon(self._on_readable)

    def _readable(self) -> bool:
        sock = self._client.socket()
        if sock is None:
            return False
        if self._client.unread() or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return True
        return bool(select.select([sock], [], [], 0)[0])

    def pause(self) -> None:
        """Stop reading (the broker keeps what it has not sent; its window bounds the rest)."""
        if not self._paused and self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock)
            self._paused = True

    def resume(self) -> None:
        """Read again, and what TLS holds decrypted already; the silence before counts for nothing.

        (A `quiet()` reader lets the housekeeping mark the bridge caught up, while the socket may
        hold a window of what the broker sent meanwhile.)
        """
        if self._paused and self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock, self._on_readable)
            self._paused = False
            self._heard_at = time.monotonic()
        self._read_what_is_held()

    def _read_what_is_held(self) -> None:
        """Bytes the reader left (a full batch), in TLS or our read buffer: no select sees them."""
        sock = self._sock
        held = self._client.unread() or (isinstance(sock, ssl.SSLSocket) and sock.pending())
        if held and sock is not None and self._loop is not None:
            self._loop.call_soon(self._on_readable)

    def quiet(self) -> bool:
        """Whether a tick went by with nothing read."""
        return time.monotonic() - self._heard_at >= TICK_S

    def _wake(self) -> None:
        if self._news is not None:
            self._news.set()

    # ---- the loop of its own (the bridge's) -------------------------------------------------

    def _close_loop(self) -> None:
        sock = self._client.socket()
        if sock is not None:  # a connection that never got through, or one left at an error
            self._unwatch(sock)
            sock.close()
        super()._close_loop()

    # ---- connecting --------------------------------------------------------------------------

    def _reading(self) -> PahoIngest | None:
        return self if self._connected else None

    async def _first_connect(self, sink: PipelinedSink, known_filters: Sequence[str]) -> bool:
        """`known_filters`: 3.1.1 need not subscribe to those again (that re-sends retained)."""
        addr = self.session.address
        try:
            await self._open_socket(sink)
        except OSError as exc:  # ssl.SSLError (e.g. certificate verify failed) included
            hint = "check --ca" if isinstance(exc, ssl.SSLError) else "check --broker and that "
            raise BrokerUnreachable(
                f"{addr}: {describe(exc)}",
                hint if isinstance(exc, ssl.SSLError) else hint + "the broker runs",
            ) from exc
        return await self._handshake(sink, known_filters)

    async def _connect(self, sink: PipelinedSink, known_filters: Sequence[str]) -> bool:
        await self._open_socket(sink)
        return await self._handshake(sink, known_filters)

    async def _open_socket(self, sink: PipelinedSink) -> None:
        """Connect with paho in a worker thread (it blocks); then the loop watches the socket."""
        if self._news is None:
            self._news = asyncio.Event()
        self._connack = None
        # A new connection voids the acks of the old one; count it before any packet is read.
        self._generation = sink.new_connection()
        self._unwatch(self._sock)  # paho's connect closes it, in the worker thread
        connecting = asyncio.ensure_future(asyncio.to_thread(self._connect_blocking))
        try:
            await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # A stop: paho's connect goes on in its thread (its connect timeout bounds it). It
            # ends first, so that no socket opens behind the shutdown's back.
            await asyncio.wait({connecting})
            if not connecting.cancelled():
                connecting.exception()  # looked at: the stop is what is raised
            raise
        sock = self._client.socket()
        if not isinstance(sock, socket.socket):
            raise BrokerUnreachable(f"{self.session.address} closed the connection")
        self._watch(sock)

    def _connect_blocking(self) -> None:
        addr = self.session.address
        if self._is_v5():
            properties = PahoProperties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.session.session_expiry
            properties.ReceiveMaximum = self.session.receive_maximum
            self._client.connect(
                addr.host,
                addr.port,
                self.session.keepalive,
                # paho's default (FIRST_ONLY) wipes the session at every process start.
                clean_start=False,
                properties=properties,
            )
        else:
            self._client.connect(addr.host, addr.port, self.session.keepalive)

    async def _handshake(self, sink: PipelinedSink, known_filters: Sequence[str]) -> bool:
        session_present, rc = await self._wait_for("CONNACK", lambda: self._connack)
        if rc is not None and rc.is_failure:
            self._client.disconnect()
            raise BrokerRefused(f"{self.session.address}: {rc}", "check the user name and password")
        await self._subscribe(
            self.filters
            if self._is_v5() or not session_present
            else [f for f in self.filters if f not in known_filters]
        )
        gone = [f for f in known_filters if f not in self.filters]
        if gone and session_present:
            self._client.unsubscribe(gone)
        if self._client.socket() is None:
            # Closed right behind its SUBACK: paho's disconnect came while `_connected` was
            # still False, so nothing else would ever notice (no reconnect, no reads: stuck).
            raise BrokerUnreachable(f"{self.session.address} closed the connection after SUBACK")
        self._announce(online=True)
        self._connected = True
        self._hooks.connected(session_present, self.filters)
        if sink.has_work:
            self.commit_or_hold(self)  # what arrived during the handshake
        return session_present

    def _announce(self, online: bool) -> None:
        """Publish the retained status (written before any ack that follows it)."""
        presence = self.session.presence
        if presence is not None:
            payload = presence.online if online else presence.offline
            self._client.publish(presence.topic, payload, qos=1, retain=True)

    def _is_v5(self) -> bool:
        return self.session.target.mqtt5

    async def _subscribe(self, filters: Sequence[str]) -> None:
        if not filters:
            return
        self._suback = None
        if self._is_v5():
            self._client.subscribe(
                [
                    (
                        f,
                        SubscribeOptions(
                            qos=1,
                            # No-local is a protocol error on a shared subscription (MQTT-3.8.3-4).
                            noLocal=not f.startswith("$share/"),
                            retainAsPublished=True,
                            retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB,
                        ),
                    )
                    for f in filters
                ]
            )
        else:
            self._client.subscribe([(f, 1) for f in filters])
        codes = await self._wait_for("SUBACK", lambda: self._suback)
        refused = [f for f, rc in zip(filters, codes, strict=False) if rc.is_failure]
        if refused:
            raise BrokerRefused(
                f"subscription to {', '.join(refused)} refused",
                "check the broker's ACL for the bridge's user",
            )

    async def _wait_for(self, what: str, ready: Callable[[], _T | None]) -> _T:
        assert self._news is not None
        assert self._loop is not None
        deadline = self._loop.time() + CONNECT_TIMEOUT_S
        while (value := ready()) is None:
            if self._client.socket() is None:
                raise BrokerUnreachable(
                    f"{self.session.address} closed the connection before {what}"
                )
            left = deadline - self._loop.time()
            if left <= 0:
                raise no_answer(self.session.address, what)
            self._news.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, TICK_S)):
                    await self._news.wait()
        return value

    # ---- running -----------------------------------------------------------------------------

    async def _serve(self, sink: PipelinedSink, stop: threading.Event) -> None:
        if self._news is None:
            self._news = asyncio.Event()
        while not stop.is_set():
            if self._failure is not None:
                raise self._failure
            if not self._connected:
                if self.taken_over is not None:
                    raise self.taken_over  # the shutdown stores what is held; its acks are void
                await self._reconnect(sink, stop)
                continue
            self._news.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._news.wait()  # or a lost connection, at once
            if self._connected:
                self._housekeeping()
            self._hooks.tick()

    def _housekeeping(self) -> None:
        """Between reads: the commit path's (`_between_reads`), then paho's keepalive."""
        self._between_reads(self)
        if self._paused:
            # Its PINGRESPs wait unread in the socket (as AsyncIngest's do): paho would take that
            # for a dead broker after a keepalive and drop the connection (the will said offline,
            # every held message came again). Forgetting the PINGREQ sent makes paho send the
            # next one when due instead; paho has no API for it.
            self._client._ping_t = 0
        # PINGREQ when due; a PINGRESP missing for a keepalive closes the socket (on_disconnect).
        self._client.loop_misc()

    def ack(self, tokens: Sequence[object]) -> None:
        """Acknowledge stored messages in receive order (tokens of old connections are skipped).

        On the loop, as every call into paho; written at once, not at the next writable turn.
        """
        client = self._client
        generation = self._generation
        acks = [cast("tuple[int, int, int]", token) for token in tokens]
        mine = [(mid, qos) for gen, mid, qos in acks if gen == generation]
        if not mine:
            return
        if all(qos == 1 for _, qos in mine):
            client.puback_all([mid for mid, _ in mine])  # one write for the batch
        else:  # QoS 2 (never on the bridge's QoS 1 subscriptions): paho's PUBCOMPs
            for mid, qos in mine:
                client.ack(mid, qos)
        if self._sock is not None:
            client.loop_write()

    def _connection_lost(self, why: str) -> None:
        super()._connection_lost(why)
        self._wake()

    async def _drop(self) -> None:
        """Nothing to do: paho's next connect closes the old socket (the loop stops watching)."""

    async def _goodbye(self) -> None:
        """Offline status, DISCONNECT, half-close; what comes is dropped until the broker closes.

        paho closes its socket once the DISCONNECT is written, unread data in it or not: the
        socket is kept open past that close (`_on_socket_close`) and half-closed instead.
        """
        self._announce(online=False)  # a clean DISCONNECT discards the will
        self._leaving = True
        try:
            self._client.disconnect()
            await self._flushed()
        finally:
            self._leaving = False
        kept, self._kept = self._kept, None
        if kept is not None:
            await _until_the_broker_closes(kept)

    async def _flushed(self) -> None:
        """Until paho wrote what it queued (the writer callback writes), or a timeout."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while self._client.want_write() and self._client.socket() is not None:
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.001)


def _half_closed(sock: socket.socket) -> socket.socket | None:
    """A handle of its own on the socket paho is closing, its write side ended (a FIN).

    Closing a socket with unread data in it makes the kernel send a reset, and the broker then
    discards the acknowledgements (and the DISCONNECT) it had not read yet: they come again as
    duplicates. paho closes its handle; this one keeps the connection open, ends the write side
    after what was written (the acks, the DISCONNECT), and reads on until the broker closes.
    On TLS too: the records are written whole, and what comes back is dropped unread.
    """
    try:
        kept = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return None  # closed already (a failed write): nothing to keep
    try:
        kept.shutdown(socket.SHUT_WR)
        kept.setblocking(False)
    except OSError:
        kept.close()
        return None
    return kept


async def _until_the_broker_closes(kept: socket.socket) -> None:
    """Read and drop (unacknowledged, it is sent again) until the broker closes, or a timeout."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            while await loop.sock_recv(kept, 65536):
                pass
    except (TimeoutError, OSError):
        pass  # closed as before: the broker may lose what it had not read
    finally:
        kept.close()
