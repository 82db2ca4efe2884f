"""MQTT connections: the only package that imports paho-mqtt, aiomqtt or mqtt5.

- `async_ingest`: the MQTT 5 ingest transport on asyncio + `mqtt5` (the default on MQTT 5).
- `ingest`: the paho ingest transport (MQTT 3.1.1, and `--transport paho`), and what both
  ingest transports share (`Session`, `Sink`, `Hooks`, `Stall`).
- `aio`: an asyncio connection on aiomqtt for the restore service on MQTT 3.1.1.
- `codec`: an asyncio connection on the `mqtt5` codec (and `v311` for MQTT 3.1.1) that
  acknowledges a message only when its consumer is done with it, and publishes pre-encoded
  packets (`packets`) within one window: the restore client, and the restore service on MQTT 5.
"""

from mqtt_backup.mqtt.aio import AsyncConnection, Inbound, OutProps, TlsFiles, Window
from mqtt_backup.mqtt.async_ingest import AsyncIngest, Beside
from mqtt_backup.mqtt.codec import CodecConnection, Delivery
from mqtt_backup.mqtt.ingest import REPLAY_PROPERTY, PahoIngest, Session, Stall

__all__ = [
    "REPLAY_PROPERTY",
    "AsyncConnection",
    "AsyncIngest",
    "Beside",
    "CodecConnection",
    "Delivery",
    "Inbound",
    "OutProps",
    "PahoIngest",
    "Session",
    "Stall",
    "TlsFiles",
    "Window",
]
