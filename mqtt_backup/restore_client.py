"""The restore client behind `mqtt-backup restore`: asks over MQTT, streams the answer back.

It subscribes to its response topic first, then publishes the request with a fresh id (and, on
MQTT 5, a response topic and correlation data of its own), and reads until the terminal message.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mqtt_backup.config import BrokerAddress
from mqtt_backup.errors import BrokerError, UsageError
from mqtt_backup.mqtt import AsyncConnection, Inbound, OutProps, TlsFiles


class NoAnswer(BrokerError):
    """no bridge answered: {detail}"""


@dataclass(frozen=True, slots=True)
class Ask:
    """One restore request as the client sends it."""

    address: BrokerAddress
    device: str
    fields: dict[str, Any]
    namespace: str = "backup"
    protocol: str = "5"
    tls_files: TlsFiles | None = None
    timeout: float = 10.0


def check_device(device: str) -> None:
    """UsageError unless the device id is one non-empty topic level without wildcards."""
    if not device or any(c in device for c in "/+#"):
        raise UsageError(
            f"device {device!r} must be one topic level (no '/', '+' or '#')",
            "mqtt-backup devices lists the stored ids",
        )


async def ask(question: Ask, on_message: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Send the request; call `on_message` per stored message; return the terminal message.

    NoAnswer when nothing arrives for `timeout` seconds; BrokerError when the broker fails.
    """
    check_device(question.device)
    request_id = uuid.uuid4().hex
    request_topic = f"{question.namespace}/restore/{question.device}"
    async with AsyncConnection(
        question.address, protocol=question.protocol, tls_files=question.tls_files
    ) as conn:
        # MQTT 5: a topic of our own. The default <request>/response is heard too (filtered by
        # id): a bridge on MQTT 3.1.1 cannot see our response topic and answers there.
        default_topic = f"{request_topic}/response"
        reply_topic = f"{request_topic}/{request_id}" if conn.mqtt5 else default_topic
        await conn.subscribe(list(dict.fromkeys((reply_topic, default_topic))), qos=1)
        payload = json.dumps({**question.fields, "id": request_id}).encode("utf-8")
        props = OutProps(response_topic=reply_topic, correlation_data=request_id.encode("ascii"))
        await conn.publish(request_topic, payload, qos=1, props=props)
        loop = asyncio.get_running_loop()
        try:
            # One deadline, pushed back on every message (cheaper than a wait_for per message).
            async with asyncio.timeout(question.timeout) as deadline:
                async for message in conn.messages():
                    deadline.reschedule(loop.time() + question.timeout)
                    body = _ours(message, request_id)
                    if body is None:
                        continue
                    if "done" in body or "error" in body:
                        return body
                    on_message(body)
        except TimeoutError:
            raise NoAnswer(
                f"nothing on {reply_topic} for {question.timeout:g} s",
                "check that 'mqtt-backup run' is connected to this broker, or raise --timeout",
            ) from None
        raise NoAnswer(f"the connection to {question.address} closed before the answer ended")


def _ours(message: Inbound, request_id: str) -> dict[str, Any] | None:
    try:
        body = json.loads(message.payload)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("id") != request_id:
        return None
    return body
