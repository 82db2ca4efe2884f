"""The restore client behind `mqtt-backup restore`: asks over MQTT, streams the answer back.

It subscribes to its response topic first, then publishes the request with a fresh id (and, on
MQTT 5, a response topic and correlation data of its own), and reads until the terminal message.
It acknowledges a message only once it is written, so the broker, not this process, holds what a
slow output has not taken yet; and it checks `seq` and the terminal's count, so a message lost on
the way (a broker queue limit) makes the restore fail instead of leaving a silent hole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mqtt_backup import jsontext
from mqtt_backup.config import BrokerTarget
from mqtt_backup.errors import BackupError, BrokerError, UsageError
from mqtt_backup.mqtt import CodecConnection, Delivery
from mqtt_backup.records import Properties
from mqtt_backup.restore.request import BadRequest, Request
from mqtt_backup.topics import check_device


class NoAnswer(BrokerError):
    """no bridge answered: {detail}"""


class LostOnTheWay(BackupError):
    """the restore is incomplete, messages were lost between the bridge and here: {detail}"""


@dataclass(frozen=True, slots=True)
class Ask:
    """One restore request as the client sends it."""

    target: BrokerTarget
    request: Request
    namespace: str = "backup"
    timeout: float = 10.0


def request_for(device: str, fields: dict[str, Any]) -> Request:
    """The request for `device` from JSON fields, checked by the bridge's own parser.

    UsageError, before anything is sent, for what the bridge would refuse.
    """
    check_device(device)
    try:
        return Request.from_fields(device, fields)
    except BadRequest as exc:
        raise UsageError(exc.reason) from None


def _nothing() -> None:
    pass


async def ask(
    question: Ask,
    on_message: Callable[[dict[str, Any]], None],
    flush: Callable[[], None] = _nothing,
) -> dict[str, Any]:
    """Send the request; call `on_message` per stored message; return the terminal message.

    `on_message` owns the object it is given. `flush` is called before each acknowledgement:
    what `on_message` took must be written when it returns (a consumer may batch its writes).
    A message is acknowledged only after that, so a slow consumer holds the broker back
    (within our Receive Maximum) instead of a queue here overflowing.
    NoAnswer when nothing arrives for `timeout` seconds; BrokerError when the broker fails;
    LostOnTheWay when the answer ended with messages missing.
    """
    check_device(question.request.device)
    request_id = uuid.uuid4().hex
    request = dataclasses.replace(question.request, request_id=request_id)
    request_topic = f"{question.namespace}/restore/{request.device}"
    async with CodecConnection(question.target) as conn:
        # MQTT 5: a topic of our own. The default <request>/response is heard too (filtered by
        # id): a bridge on MQTT 3.1.1 cannot see our response topic and answers there.
        default_topic = f"{request_topic}/response"
        own = _Own(f"{request_topic}/{request_id}" if conn.mqtt5 else default_topic, request_id)
        await conn.subscribe(list(dict.fromkeys((own.topic, default_topic))), qos=1)
        props = Properties(response_topic=own.topic, correlation_data=own.correlation)
        await conn.publish(request_topic, request.payload(), qos=1, props=props)
        try:
            terminal = await _read_answer(conn, own, question.timeout, on_message, flush)
        except TimeoutError:
            raise own.silence(question.timeout) from None
    if not request.replay:  # a replay's messages go to their own topics
        own.check_complete(terminal)
    return terminal


async def _read_answer(
    conn: CodecConnection,
    own: _Own,
    timeout: float,
    on_message: Callable[[dict[str, Any]], None],
    flush: Callable[[], None],
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    # One deadline, pushed back on every batch that held an answer for us (cheaper than a
    # wait_for per message); others' traffic on the default response topic does not count.
    async with asyncio.timeout(timeout) as deadline:
        while True:
            batch = await conn.receive()
            ours = False
            for done, message in enumerate(batch, 1):
                body = own.body(message)
                if body is None:
                    continue
                if "done" in body or "error" in body:
                    flush()
                    conn.ack(batch[:done])
                    return body
                ours = True
                own.count(body)
                on_message(body)
            if ours:
                deadline.reschedule(loop.time() + timeout)
            flush()
            conn.ack(batch)  # written: now the broker may send more


class _Own:
    """Which incoming messages answer our request, and whether any of them went missing."""

    def __init__(self, topic: str, request_id: str) -> None:
        self.topic = topic
        self.request_id = request_id
        self.correlation = request_id.encode("ascii")
        self.received = 0
        self._next_seq: int | None = 1
        self.missing: list[tuple[int, int]] = []

    def body(self, message: Delivery) -> dict[str, Any] | None:
        """The JSON object of a message for us; None for anything else."""
        try:
            body = jsontext.loads(message.payload)
        except ValueError:
            return None
        if not isinstance(body, dict):
            return None
        if body.get("id") == self.request_id:
            return body
        # An error about a request whose id could not be read: only our own topic and
        # correlation data say it is ours.
        if "id" not in body and self._addressed_to_us(message):
            return body
        return None

    def _addressed_to_us(self, message: Delivery) -> bool:
        return message.topic == self.topic and message.correlation_data == self.correlation

    def count(self, body: dict[str, Any]) -> None:
        """Note a stored message, and a hole in `seq` before it."""
        self.received += 1
        seq = body.get("seq")
        if not isinstance(seq, int) or self._next_seq is None:
            self._next_seq = None  # no sequence to check
            return
        if seq > self._next_seq:
            self.missing.append((self._next_seq, seq - 1))
        self._next_seq = seq + 1

    def check_complete(self, terminal: dict[str, Any]) -> None:
        """LostOnTheWay when the bridge sent more than arrived."""
        sent = terminal.get("count")
        if "done" not in terminal or not isinstance(sent, int) or sent <= self.received:
            return
        raise LostOnTheWay(
            f"{sent - self.received} of {sent} messages did not arrive{self._holes()}", _QUEUE_HINT
        )

    def silence(self, timeout: float) -> BrokerError | LostOnTheWay:
        """The error for an answer that stopped (or never started) before its terminal."""
        if self.missing:
            # A broker drops the terminal as readily as any message once its queue is full.
            return LostOnTheWay(
                f"{self.received} messages arrived{self._holes()}, then nothing for {timeout:g} s",
                _QUEUE_HINT,
            )
        if self.received:
            return NoAnswer(
                f"the answer stopped after {self.received} messages: nothing for {timeout:g} s",
                "look at the bridge's log, or raise --timeout",
            )
        return NoAnswer(
            f"nothing on {self.topic} for {timeout:g} s",
            "check that 'mqtt-backup run' is connected to this broker, or raise --timeout",
        )

    def _holes(self) -> str:
        if not self.missing:
            return ""
        shown = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in self.missing[:5])
        return f" (missing seq {shown}{', ...' if len(self.missing) > 5 else ''})"


_QUEUE_HINT = (
    "the broker dropped them (its queue for this client was full): raise its"
    " max_queued_messages, or write to a faster output, and restore again"
)
