"""The restore path: a request from the wire to the stored messages and back.

- `request`: the `Request` type and its strict parser (pure; shared by the service and the client).
- `reply`: the messages of one answer, their pacing, and the window of publishes in flight.
- `service`: the service, the watcher of the broker's dropped counter, and the serve loop.
- `client`: `mqtt-backup restore`: asks over MQTT and streams the answer back.

The service's names load with their module on first use (PEP 562): `mqtt-backup restore` imports
`request` and `client`, and never pays for the service, its replies and the storage below them
(docs/design-notes.md, "Restore client: acknowledge what is written").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mqtt_backup.restore.service import DroppedWatcher, RestoreService, ServeOptions, serve

__all__ = ["DroppedWatcher", "RestoreService", "ServeOptions", "serve"]


def __getattr__(name: str) -> object:
    """The service's names, from `restore.service`, on first use."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.service"), name)
