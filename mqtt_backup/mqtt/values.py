"""Plain MQTT values shared by every connection: what callers see instead of a client's types.

No MQTT client library is imported here: `mqtt-backup run` on the default transport loads neither
paho nor aiomqtt (docs/design-notes.md, "Start-up").
"""

from __future__ import annotations

from dataclasses import dataclass

from mqtt_backup.config import BrokerTarget, TlsFiles

__all__ = ["BrokerTarget", "Delivery", "TlsFiles"]


@dataclass(slots=True)
class Delivery:
    """An incoming PUBLISH, from any connection: a restore request, a response, a reading.

    On the codec connection, `ack` it once it is processed (QoS 1: `packet_id` is set); aiomqtt
    acknowledges by itself (`packet_id` None). Its MQTT 5 properties are flat fields: the
    restore client and service read one or two of them per message. Not frozen, though nothing
    changes one: a frozen dataclass sets each field through `object.__setattr__`, 5-7 us per
    message here, a sixth of what the restore client spent on one.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None
    payload_format: int = 0
    message_expiry: int | None = None
