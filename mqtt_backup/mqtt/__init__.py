"""MQTT connections: the only package that imports paho-mqtt, aiomqtt or mqtt5.

- `async_ingest`: the MQTT 5 ingest transport on asyncio + `mqtt5` (the default on MQTT 5).
- `ingest`: the paho ingest transport (MQTT 3.1.1, and `--transport paho`).
- `loop_ingest`: what both ingest transports share on the bridge's loop (`LoopIngest`: the one
  commit in flight, the hold path, reconnect and shutdown; `Beside`).
- `session`: the plain types both ingest transports share (`Session`, `Sink`, `Hooks`, `Stall`,
  `Presence`).
- `aio`: an asyncio connection on aiomqtt for the restore service on MQTT 3.1.1.
- `codec`: an asyncio connection on the `mqtt5` codec (and `v311` for MQTT 3.1.1) that
  acknowledges a message only when its consumer is done with it, and publishes pre-encoded
  packets (`packets`) within one window: the restore client, and the restore service on MQTT 5.
- `values` (`TlsFiles`, `Delivery`) and `window` (`Window`): plain types every connection
  shares; a message's MQTT 5 properties, stored or outgoing, are `records.Properties`.

paho and aiomqtt load only with the module that needs them: `AsyncConnection` and `PahoIngest`
are imported on first use, so `mqtt-backup run` on the default transport loads neither
(docs/design-notes.md, "Start-up"; tests/test_cli_lazy.py pins it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mqtt_backup.mqtt.async_ingest import AsyncIngest
from mqtt_backup.mqtt.codec import CodecConnection
from mqtt_backup.mqtt.loop_ingest import Beside
from mqtt_backup.mqtt.session import REPLAY_PROPERTY, Session, Stall
from mqtt_backup.mqtt.values import Delivery, TlsFiles
from mqtt_backup.mqtt.window import Window

if TYPE_CHECKING:
    from mqtt_backup.mqtt.aio import AsyncConnection
    from mqtt_backup.mqtt.ingest import PahoIngest

# Name -> the module that defines it, imported on the first lookup (PEP 562).
_ON_FIRST_USE = {"AsyncConnection": "aio", "PahoIngest": "ingest"}

__all__ = [
    "REPLAY_PROPERTY",
    "AsyncConnection",
    "AsyncIngest",
    "Beside",
    "CodecConnection",
    "Delivery",
    "PahoIngest",
    "Session",
    "Stall",
    "TlsFiles",
    "Window",
]


def __getattr__(name: str) -> object:
    """`AsyncConnection` and `PahoIngest`, from their modules, on first use."""
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
