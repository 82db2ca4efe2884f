"""The ingest transport on paho-mqtt.

`PahoIngest` is the ingest transport: a paho client with a persistent session and manual acks,
driven by its own loop so that a batch closes the moment the socket has nothing more to read.
"""

from __future__ import annotations

import dataclasses
import logging
import select
import ssl
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
    BrokerError,
    BrokerRefused,
    BrokerUnreachable,
    SessionTakenOver,
    StorageUnavailable,
)
from mqtt_backup.mqtt.backoff import Backoff
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
from mqtt_backup.records import Properties, Record

log = logging.getLogger(__name__)

_T = TypeVar("_T")


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


class PahoIngest:
    """Ingest transport on paho-mqtt: persistent session, QoS 1, manual acks after the sync."""

    def __init__(self, session: Session, filters: Sequence[str], hooks: Hooks) -> None:
        self.session = session
        self.filters = list(filters)
        self._hooks = hooks
        self._sink: Sink | None = None
        self._generation = 0  # the sink's number of the open connection
        self._connack: tuple[bool, ReasonCode | None] | None = None
        self._suback: list[ReasonCode] | None = None
        self._connected = False
        self.taken_over: SessionTakenOver | None = None
        self.stall = Stall()
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        v5 = self._is_v5()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.session.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
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
        client.on_disconnect = self._on_disconnect
        return client

    # ---- paho callbacks (run inside loop_read on this thread) -------------------------------

    def _on_connect(
        self, _c: paho.Client, _u: object, flags: paho.ConnectFlags, rc: ReasonCode, _p: object
    ) -> None:
        self._connack = (flags.session_present, rc)

    def _on_subscribe(
        self, _c: paho.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        self._suback = codes

    @property
    def connected(self) -> bool:
        """Whether a connection to the broker is up."""
        return self._connected

    def _on_disconnect(
        self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        if isinstance(rc, ReasonCode) and rc.value == SESSION_TAKEN_OVER:
            self.taken_over = taken_over(self.session.client_id)
        if self._connected:
            self._connected = False
            self._hooks.disconnected(str(rc))

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        if self._sink is None:
            return
        props = _paho_properties(msg.properties)
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        record = Record(msg.topic, payload, msg.qos, bool(msg.retain), bool(msg.dup), props)
        token = (self._generation, msg.mid, msg.qos) if msg.qos else None
        self._sink.offer(record, token, _is_replay(props))

    # ---- connecting --------------------------------------------------------------------------

    def connect(self, sink: Sink, known_filters: Sequence[str]) -> bool:
        """First connection: BrokerError when the broker cannot be reached or refuses.

        Messages may arrive as soon as the broker answers (a stored queue), so the sink comes first.

        Returns whether the broker still had the session. `known_filters` are the subscriptions
        the session had before, so MQTT 3.1.1 need not subscribe again (which re-sends retained).
        """
        self._sink = sink
        addr = self.session.address
        try:
            self._open_socket()
        except OSError as exc:  # ssl.SSLError (e.g. certificate verify failed) included
            hint = "check --ca" if isinstance(exc, ssl.SSLError) else "check --broker and that "
            raise BrokerUnreachable(
                f"{addr}: {describe(exc)}",
                hint if isinstance(exc, ssl.SSLError) else hint + "the broker runs",
            ) from exc
        return self._handshake(known_filters)

    def _open_socket(self) -> None:
        self._connack = None
        # A new connection voids the acks of the old one; count it before any packet is read.
        assert self._sink is not None
        self._generation = self._sink.new_connection()
        properties = None
        if self._is_v5():
            properties = PahoProperties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.session.session_expiry
            properties.ReceiveMaximum = self.session.receive_maximum
            self._client.connect(
                self.session.address.host,
                self.session.address.port,
                self.session.keepalive,
                # paho's default (FIRST_ONLY) wipes the session at every process start.
                clean_start=False,
                properties=properties,
            )
        else:
            self._client.connect(
                self.session.address.host, self.session.address.port, self.session.keepalive
            )

    def _handshake(self, known_filters: Sequence[str]) -> bool:
        session_present, rc = self._wait_for("CONNACK", lambda: self._connack)
        if rc is not None and rc.is_failure:
            self._client.disconnect()
            raise BrokerRefused(f"{self.session.address}: {rc}", "check the user name and password")
        self._subscribe(
            self.filters
            if self._is_v5() or not session_present
            else [f for f in self.filters if f not in known_filters]
        )
        gone = [f for f in known_filters if f not in self.filters]
        if gone and session_present:
            self._client.unsubscribe(gone)
        self._announce(online=True)
        self._connected = True
        self._hooks.connected(session_present, self.filters)
        return session_present

    def _announce(self, online: bool) -> None:
        """Publish the retained status (written with the next loop_write, before any ack)."""
        presence = self.session.presence
        if presence is not None:
            payload = presence.online if online else presence.offline
            self._client.publish(presence.topic, payload, qos=1, retain=True)

    def _is_v5(self) -> bool:
        return self.session.target.mqtt5

    def _subscribe(self, filters: Sequence[str]) -> None:
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
        codes = self._wait_for("SUBACK", lambda: self._suback)
        refused = [f for f, rc in zip(filters, codes, strict=False) if rc.is_failure]
        if refused:
            raise BrokerRefused(
                f"subscription to {', '.join(refused)} refused",
                "check the broker's ACL for the bridge's user",
            )

    def _wait_for(self, what: str, ready: Callable[[], _T | None]) -> _T:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while (value := ready()) is None:
            if time.monotonic() > deadline:
                raise BrokerUnreachable(f"no {what} from {self.session.address} in time")
            # Not client.loop(): it would add a wake-up socketpair write to every later ack.
            if not self._pump(0.1) and (value := ready()) is None:
                raise BrokerUnreachable(
                    f"{self.session.address} closed the connection before {what}"
                )
        return value

    # ---- running -----------------------------------------------------------------------------

    def run(self, sink: Sink, stop: threading.Event) -> None:
        """Feed the sink until `stop` is set, reconnecting with backoff; then shut down in order."""
        self._sink = sink
        while not stop.is_set():
            self._hooks.tick()
            if not self._connected:
                if self.taken_over is not None:
                    self._commit_unacked(sink)  # storing twice is safe; the acks are void
                    raise self.taken_over
                self._reconnect(stop)
                continue
            self._serve(sink, self.stall)
        self._shutdown(sink)

    def _serve(self, sink: Sink, stall: Stall) -> None:
        if stall.active:
            # Storage is failing: keep reading (keepalive answers; the broker's window of
            # unacknowledged messages bounds what arrives), hold it, retry later.
            self._pump(min(stall.seconds_left(), 0.2), read=sink.can_hold())
            if stall.seconds_left() == 0:
                self._commit(sink, stall)
            return
        wait = sink.seconds_left() if sink.has_work else 0.5
        self._pump(wait, read=not sink.full())
        if not sink.has_work:
            sink.caught_up(time.time_ns())  # a whole wait went by with nothing to store
        elif sink.due() or not self._readable():
            self._commit(sink, stall)

    def _commit(self, sink: Sink, stall: Stall) -> None:
        drained_at = None if sink.full() or self._readable() else time.time_ns()
        try:
            stored = sink.commit()
        except StorageUnavailable as exc:
            stall.failed(exc)
            return
        stall.cleared()
        self._client.loop_write()
        # A drained socket means the broker had sent all it had, unless its window of
        # unacknowledged messages held the rest back: count only batches below any window.
        if drained_at is not None and stored < CAUGHT_UP_BELOW:
            sink.caught_up(drained_at)

    def announce(self, presence: Presence) -> None:
        """A new retained status (the partitions changed), published now when connected.

        It is also the one of the next connect and of the stop (the will keeps the old body
        until the next connect: MQTT cannot change a will).
        """
        self.session = dataclasses.replace(self.session, presence=presence)
        if self._connected:
            self._announce(online=True)

    def keep_alive(self) -> None:
        """Service the connection without committing: answer keepalives, hold what arrives.

        During a unit of a long operation on the ingest thread (`commit_held` stores what it
        holds between units); the broker's window bounds what is held.
        """
        if self._connected and self._sink is not None:
            self._pump(0, read=self._sink.can_hold())

    def commit_held(self) -> None:
        """Store what is held and acknowledge it, between two units of a long operation.

        On the ingest thread, as every commit here (paho's callbacks run on it too). A failure
        starts the stall, as always. Nothing happens without a connection to acknowledge on:
        what is held waits for the operation's end.
        """
        if self._connected and self._sink is not None and self._sink.has_work:
            self._commit(self._sink, self.stall)

    def _readable(self) -> bool:
        sock = self._client.socket()
        if sock is None:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        return bool(select.select([sock], [], [], 0)[0])

    def _pump(self, timeout: float, read: bool = True) -> bool:
        """Wait up to `timeout` for the socket, then read while it has data and the batch has room.

        Returns False when the connection is gone.
        """
        client = self._client
        sock = client.socket()
        if sock is None:
            return self._connection_lost("socket closed")
        wlist = [sock] if client.want_write() else []
        rlist = [sock] if read else []
        try:
            readable, writable, _ = select.select(rlist, wlist, [], timeout)
        except (OSError, ValueError):
            return self._connection_lost("socket error")
        if writable and client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return self._connection_lost("write failed")
        if read and (readable or (isinstance(sock, ssl.SSLSocket) and sock.pending())):
            rc = self._read_available()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return self._connection_lost(paho.error_string(rc))
        if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return self._connection_lost("keepalive timed out")
        return True

    def _read_available(self) -> MQTTErrorCode:
        sink = self._sink
        while True:
            rc = self._client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
            if (sink is not None and sink.full()) or not self._readable():
                return rc

    def _connection_lost(self, why: str) -> bool:
        if self._connected:
            self._connected = False
            self._hooks.disconnected(why)
        return False

    def _reconnect(self, stop: threading.Event) -> None:
        """Reconnect with exponential backoff and jitter until it works or `stop` is set."""
        sink = self._sink
        if sink is not None:
            # Acks of the closed connection are void (a packet id means nothing on another one).
            # Its messages stay held: the broker resends only those whose expiry has not passed.
            sink.drop_tokens(lambda _token: False)
        backoff = Backoff()
        while not stop.is_set():
            if sink is not None and not self._room_for_a_connection(sink):
                self._hooks.tick()
                stop.wait(max(self.stall.seconds_left(), 0.1))
                continue
            try:
                self._open_socket()
                self._handshake(self.filters)
            except (OSError, ssl.SSLError, BrokerError) as exc:
                delay = backoff.next()
                log.warning(
                    "broker %s unreachable (%s); retrying in %.1fs",
                    self.session.address,
                    exc,
                    delay,
                )
                self._hooks.tick()  # operations and bookkeeping go on while the broker is away
                stop.wait(delay)
                continue
            log.info("reconnected to %s", self.session.address)
            return

    def _room_for_a_connection(self, sink: Sink) -> bool:
        """Whether the sink can take the window a new connection brings (retrying storage first).

        Held copies are never dropped, so during a storage stall each connection may add one
        broker window to them; connecting only while there is room keeps what is held bounded.
        """
        if not sink.can_hold() and self.stall.seconds_left() == 0:
            self._commit(sink, self.stall)
        return sink.can_hold()

    def _commit_unacked(self, sink: Sink) -> None:
        # Keep what was received on the lost connection: storing it twice is safe, losing it is not.
        try:
            sink.commit()
        except StorageUnavailable as exc:
            log.warning("storage still failing while disconnected: %s", exc.detail)

    def _shutdown(self, sink: Sink) -> None:
        """Stop reading, store what is pending, send its acks, disconnect, let the broker close."""
        if self._connected:
            try:
                sink.commit()
            except StorageUnavailable as exc:
                log.error(
                    "could not store %d pending messages at shutdown (not acknowledged: the "
                    "broker resends those that have not expired): %s",
                    sink.pending,
                    exc.detail,
                )
            self._announce(online=False)  # a clean DISCONNECT discards the will
            self._flush_writes()
            self._connected = False  # a disconnect we asked for is not a lost connection
            self._client.disconnect()
            self._flush_writes()
        else:
            self._commit_unacked(sink)
        self._connected = False

    def _flush_writes(self) -> None:
        deadline = time.monotonic() + 5
        while self._client.want_write() and time.monotonic() < deadline:
            if self._client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            time.sleep(0.001)

    def ack(self, tokens: Sequence[object]) -> None:
        """Acknowledge stored messages in receive order (tokens of old connections are skipped)."""
        ack = self._client.ack
        generation = self._generation
        for token in tokens:
            gen, mid, qos = cast("tuple[int, int, int]", token)
            if gen == generation:
                ack(mid, qos)
