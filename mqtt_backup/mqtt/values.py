"""Plain MQTT values shared by every connection: what callers see instead of a client's types.

No MQTT client library is imported here: `mqtt-backup run` on the default transport loads neither
paho nor aiomqtt (docs/design-notes.md, "Start-up").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """CA file for an mqtts:// broker; client certificate and key for mTLS."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message as a restore request or a response: what the receiver needs of it."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class OutProps:
    """MQTT 5 properties of an outgoing message (ignored on MQTT 3.1.1)."""

    correlation_data: bytes | None = None
    user: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None
    payload_format: int | None = None
    message_expiry: int | None = None
    response_topic: str | None = None
