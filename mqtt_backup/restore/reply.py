"""The answering side of a restore: the messages of one reply, their pacing, the window.

A reply is JSON envelopes (or original bytes with `format: raw`) on the response topic, or the
stored messages republished to their own topics (`mode: replay`), then exactly one terminal.
`Reply` builds each as an `Outgoing` packet (encoded once, no property object per message); an
`Outbox` sends them: on MQTT 5 through the codec connection, whose one window of publishes
awaiting their PUBACK all restores share; on MQTT 3.1.1 through aiomqtt, a window per restore.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mqtt_backup.envelope import EnvelopeText
from mqtt_backup.errors import BrokerError, BrokerRefused, BrokerUnreachable
from mqtt_backup.mqtt import REPLAY_PROPERTY, CodecConnection, Window
from mqtt_backup.mqtt.codec import CONNECTION_LOST
from mqtt_backup.mqtt.packets import Outgoing, encode_properties, encode_user, qos1_builder
from mqtt_backup.records import Properties, RecordFields, is_dup, is_retain, qos_of
from mqtt_backup.restore.request import PROTOCOL, BadRequest
from mqtt_backup.storage.journal import Gap
from mqtt_backup.tally import TALLY
from mqtt_backup.times import format_ts

# Packets per send: enough that one write carries many, few enough to bound a stream's memory.
BATCH = 64
# Characters of a stored topic an error quotes (a topic may be 65,535 bytes).
SHOWN_TOPIC = 120


class TooLarge(BadRequest):
    """A stored message whose answer would not fit the broker's Maximum Packet Size."""


@dataclass(slots=True)
class Reply:
    """The response side of one request: topic, correlation data, id, and the message count."""

    topic: str
    correlation: bytes | None
    request_id: str | None = None
    sent: int = 0
    # Answers on a topic an ingest template may match carry the loop marker, so they are not
    # stored as device data (only possible with --response-topics any).
    marked: bool = False
    # Set when the answer is one stream of several (a group): on every message and the terminal.
    instance: str | None = None
    _data_props: bytes | None = field(default=None, repr=False)
    _texts: tuple[tuple[str | None, str | None, str], EnvelopeText] | None = field(
        default=None, repr=False
    )

    def _props(self, *user: tuple[str, str], content_type: str | None = None) -> bytes:
        marker = ((REPLAY_PROPERTY, "1"),) if self.marked else ()
        return encode_properties(
            correlation_data=self.correlation, user=marker + user, content_type=content_type
        )

    @staticmethod
    def _encode(body: dict[str, Any]) -> bytes:
        # backslashreplace: a lone surrogate from a stored topic still makes valid JSON text.
        return json.dumps(body, ensure_ascii=False).encode("utf-8", "backslashreplace")

    def _with_id(self, body: dict[str, Any]) -> dict[str, Any]:
        head: dict[str, Any] = {}
        if self.request_id is not None:
            head["id"] = self.request_id
        if self.instance is not None:
            head["instance"] = self.instance
        return {**head, **body} if head else body

    def json_messages(self, device: str) -> Callable[[RecordFields], Outgoing]:
        """The builder of this answer's JSON envelopes (with `id` and `seq`) of `device`.

        One call per stored message, from its fields (`records.decode_fields`): what every
        message of the answer shares (topic, properties, the envelope's head) is made here once.
        """
        text = self._envelopes(device).fields_text
        # Correlation data only: every MQTT 5 property costs the receiving client parse time.
        if self._data_props is None:
            self._data_props = self._props()
        packet = qos1_builder(self.topic, self._data_props)

        def build(fields: RecordFields) -> Outgoing:
            self.sent += 1
            # backslashreplace, as in _encode: the same bytes json.dumps's text would give.
            return packet(text(self.sent, fields).encode("utf-8", "backslashreplace"))

        return build

    def _envelopes(self, device: str) -> EnvelopeText:
        # One writer per answer: its head (id, instance) and device are written once.
        key = (self.request_id, self.instance, device)
        if self._texts is None or self._texts[0] != key:
            head = [("id", self.request_id)] if self.request_id is not None else []
            if self.instance is not None:
                head.append(("instance", self.instance))
            self._texts = (key, EnvelopeText(head, device))
        return self._texts[1]

    def raw_message(self, device: str, fields: RecordFields) -> Outgoing:
        """One stored message as its original bytes; its metadata in user properties."""
        self.sent += 1
        ts_ns, flags, topic, original, payload = fields
        user = [
            ("mqtt-backup-seq", str(self.sent)),
            ("mqtt-backup-device", device),
            ("mqtt-backup-topic", topic),
            ("mqtt-backup-ts", format_ts(ts_ns)),
            ("mqtt-backup-qos", str(qos_of(flags))),
            ("mqtt-backup-retain", str(is_retain(flags)).lower()),
            ("mqtt-backup-dup", str(is_dup(flags)).lower()),
        ]
        if self.request_id is not None:
            user.append(("mqtt-backup-id", self.request_id))
        if self.instance is not None:
            user.append(("mqtt-backup-instance", self.instance))
        if original is not None:
            user.extend(original.user)
        if self.marked:
            user.append((REPLAY_PROPERTY, "1"))
        props = encode_properties(
            correlation_data=self.correlation,
            content_type=original.content_type if original else None,
            payload_format=original.payload_format if original else None,
        ) + encode_user(user)
        return Outgoing(self.topic, payload, 1, False, props)

    def done(self, device: str, count: int, gaps: list[Gap], drops_known: bool = True) -> Outgoing:
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
        return self._terminal(body, "done")

    def error(self, reason: str) -> Outgoing:
        """The terminal `error` message."""
        return self._terminal({"error": reason}, "error")

    def _terminal(self, body: dict[str, Any], kind: str) -> Outgoing:
        payload = self._encode(self._with_id({**body, "protocol": PROTOCOL}))
        props = self._props(("mqtt-backup-terminal", kind), content_type="application/json")
        TALLY.restore_finished(kind, self.sent)
        return Outgoing(self.topic, payload, 1, False, props)


def replayed(fields: RecordFields, retain: bool) -> Outgoing:
    """A stored message back on its own topic: marked so ingest never stores it again.

    `retain`: keep its stored retain flag (a replay asked for it).
    """
    ts_ns, flags, topic, original, payload = fields
    user = ((REPLAY_PROPERTY, "1"), ("mqtt-backup-ts", format_ts(ts_ns)))
    if original is None:
        props = encode_user(user)
    else:
        props = encode_properties(
            correlation_data=original.correlation_data,
            user=user + original.user,
            content_type=original.content_type,
            payload_format=original.payload_format,
            message_expiry=original.message_expiry,
            response_topic=original.response_topic,
        )
    return Outgoing(topic, payload, qos_of(flags), retain and is_retain(flags), props)


def too_large(outgoing: Outgoing, limit: int, raw: bool, fields: RecordFields) -> TooLarge:
    """The error for a message the broker would refuse as larger than its Maximum Packet Size.

    It names the stored message (its own topic, shortened, and time), not the packet's topic
    (the response topic of a JSON answer): the error terminal must itself fit a packet.
    """
    way_out = (
        "export it with 'mqtt-backup export'"
        if raw
        else 'ask with "format": "raw", or export it with \'mqtt-backup export\''
    )
    ts_ns, _, topic, _, _ = fields
    shown = topic if len(topic) <= SHOWN_TOPIC else topic[:SHOWN_TOPIC] + "..."
    return TooLarge(
        f"the stored message of {format_ts(ts_ns)} on {shown!r} needs a "
        f"{outgoing.size():,}-byte packet, more than the broker's maximum packet size "
        f"({limit:,} bytes); {way_out}"
    )


# ---- sending ------------------------------------------------------------------------------------


class Flow(ABC):
    """One restore's publishes: sent in order, each awaiting its PUBACK within the window."""

    @abstractmethod
    async def send(self, packets: Sequence[Outgoing]) -> None:
        """Send, in order, waiting for room in the window; the first failure so far raises."""

    @abstractmethod
    async def drain(self) -> None:
        """Wait until every packet sent is acknowledged; raise the first failure."""

    @abstractmethod
    def cancel(self) -> None:
        """Abandon what is in flight (the connection is gone or the bridge stops)."""


class Outbox(ABC):
    """Where a restore's answer goes: an MQTT connection, one `Flow` per stream."""

    mqtt5: bool
    # The broker's Maximum Packet Size; None: no limit known.
    max_packet_size: int | None = None

    @abstractmethod
    def flow(self) -> Flow:
        """A new stream of publishes."""

    async def send_one(self, packet: Outgoing) -> None:
        """Send one packet and wait for its PUBACK (a terminal)."""
        flow = self.flow()
        await flow.send([packet])
        await flow.drain()


class CodecOutbox(Outbox):
    """The MQTT 5 codec connection: one window, the broker's Receive Maximum, for every restore."""

    def __init__(self, conn: CodecConnection) -> None:
        self.conn = conn
        self.mqtt5 = conn.mqtt5
        self.max_packet_size = conn.max_packet_size

    def flow(self) -> Flow:
        """A stream whose publishes go out in batches on the shared window."""
        return _CodecFlow(self.conn)


class _CodecFlow(Flow):
    def __init__(self, conn: CodecConnection) -> None:
        self._conn = conn
        self._in_flight = 0
        self._settled = asyncio.Event()
        self._failure: BrokerError | None = None

    async def send(self, packets: Sequence[Outgoing]) -> None:
        if self._failure is not None:
            raise self._failure
        self._in_flight += len(packets)
        self._settled.clear()
        # A batch may wait in the connection's queue while the next one is built: the window
        # is refilled from it as PUBACKs arrive, with no wait for this task to run.
        await self._conn.publish_many(packets, self._acked, ahead=BATCH)

    def _acked(self, reason: int) -> None:
        self._in_flight -= 1
        if reason and self._failure is None:  # one test per PUBACK for a success (0)
            if reason == CONNECTION_LOST:
                self._failure = BrokerUnreachable(f"{self._conn.address}: connection lost")
            elif reason >= 0x80:  # an MQTT failure reason code
                self._failure = BrokerRefused(
                    f"a restore publish was refused (reason code {reason:#04x})",
                    "check the broker's ACL for the restore client",
                )
        if self._in_flight <= 0:
            self._settled.set()

    async def drain(self) -> None:
        if self._in_flight > 0:
            await self._settled.wait()
        if self._failure is not None:
            raise self._failure

    def cancel(self) -> None:
        # What is written goes out; its PUBACKs give the shared window its room back. What
        # waits in the connection's queue is dropped.
        self._failure = self._failure or BrokerUnreachable("the restore was abandoned")
        self._conn.withdraw(self._acked)


class Publisher(Protocol):
    """A connection that publishes one message at a time: aiomqtt (MQTT 3.1.1), test fakes."""

    mqtt5: bool

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        props: Properties | None = None,
    ) -> None:
        """Publish and wait for the broker to take it (PUBACK at QoS 1)."""


class PublisherOutbox(Outbox):
    """A connection that publishes one message at a time, with a window per restore."""

    def __init__(self, conn: Publisher, window: int) -> None:
        self.conn = conn
        self.mqtt5 = conn.mqtt5
        self._window = window

    def flow(self) -> Flow:
        """A stream with its own window of `window` publishes in flight."""
        return _PublisherFlow(self.conn, Window(self._window))


class _PublisherFlow(Flow):
    def __init__(self, conn: Publisher, window: Window) -> None:
        self._conn = conn
        self._window = window
        self._last: tuple[bytes, Properties] = (b"", Properties())

    async def send(self, packets: Sequence[Outgoing]) -> None:
        for p in packets:
            props = self._props(p)
            await self._window.send(self._conn.publish(p.topic, p.payload, p.qos, p.retain, props))

    def _props(self, packet: Outgoing) -> Properties:
        # The messages of a JSON answer share their properties: decoded once, not per message.
        if self._last[0] is not packet.properties:
            self._last = (packet.properties, packet.out_props())
        return self._last[1]

    async def drain(self) -> None:
        await self._window.drain()

    def cancel(self) -> None:
        self._window.cancel()


class Batches:
    """One stream's packets, sent in batches; its restore slot is taken at the first send.

    A paced replay sends each message when it is due; anything else gathers up to BATCH
    packets per send, so that one write carries many.
    """

    def __init__(self, flow: Flow, slots: asyncio.Semaphore, pacer: Pacer) -> None:
        self._flow = flow
        self._slots = slots
        self._pacer = pacer
        self._batch: list[Outgoing] = []
        self._holding = False

    def holding(self) -> bool:
        """Whether the stream holds its restore slot (it has sent, and may send on)."""
        return self._holding

    def put(self, packet: Outgoing) -> bool:
        """Queue one packet; True when it is to be sent now (`flush`): a full batch, or paced.

        Not a coroutine: a restore queues every message, and most need no await.
        """
        batch = self._batch
        batch.append(packet)
        return len(batch) >= BATCH or self._pacer.rate is not None

    async def add(self, packet: Outgoing) -> None:
        """Queue one packet; send when the batch is full, or at once when paced."""
        if self.put(packet):
            await self.flush()

    async def add_all(self, packets: list[Outgoing]) -> None:
        """Queue packets in order: `add` for each, with one test per batch, not per packet."""
        if self._pacer.rate is not None:
            for packet in packets:
                await self.add(packet)
            return
        batch = self._batch
        batch += packets
        while len(batch) >= BATCH:
            # Batches of BATCH, as `add` sends them: what waits in the connection's queue
            # stays within `ahead` and one batch.
            self._batch, rest = batch[:BATCH], batch[BATCH:]
            await self.flush()
            batch = self._batch = rest

    async def flush(self) -> None:
        """Send what is queued (after taking a restore slot, the first time).

        A paced replay queues one packet at a time: it goes out when it is due.
        """
        if not self._batch:
            return
        if self._pacer.rate:
            await self._pacer.wait()
        if not self._holding:
            # Taken here, not at the start: a scan that finds nothing to send (a filter that
            # matches nothing in a long history) never keeps another restore waiting.
            await self._slots.acquire()
            self._holding = True
        batch, self._batch = self._batch, []
        await self._flow.send(batch)

    async def finish(self) -> None:
        """Send the rest and wait until all of it is acknowledged."""
        await self.flush()
        await self._flow.drain()

    def cancel(self) -> None:
        """Abandon the stream."""
        self._batch.clear()
        self._flow.cancel()

    def release(self) -> None:
        """Give the restore slot back."""
        if self._holding:
            self._slots.release()
            self._holding = False


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
