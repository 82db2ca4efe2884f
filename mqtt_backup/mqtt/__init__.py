"""MQTT connections: the only package that imports paho-mqtt or aiomqtt.

- `ingest`: the paho ingest transport (persistent session, manual acks after the sync).
- `aio`: an asyncio connection on aiomqtt for the restore service and the restore client.
"""

from mqtt_backup.mqtt.aio import AsyncConnection, Inbound, OutProps, TlsFiles, Window
from mqtt_backup.mqtt.ingest import REPLAY_PROPERTY, PahoIngest, Session, Stall

__all__ = [
    "REPLAY_PROPERTY",
    "AsyncConnection",
    "Inbound",
    "OutProps",
    "PahoIngest",
    "Session",
    "Stall",
    "TlsFiles",
    "Window",
]
