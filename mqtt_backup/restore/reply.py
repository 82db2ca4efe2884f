"""The answering side of a restore: the messages of one reply, their pacing, the window.

A reply is JSON envelopes (or original bytes with `format: raw`) on the response topic, or the
stored messages republished to their own topics (`mode: replay`), then exactly one terminal.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from mqtt_backup.mqtt import REPLAY_PROPERTY, OutProps
from mqtt_backup.storage import StoredMessage
from mqtt_backup.storage.journal import Gap
from mqtt_backup.times import format_ts


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
