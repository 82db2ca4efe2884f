"""The restore path: a request from the wire to the stored messages and back.

- `request`: the `Request` type and its strict parser (pure; shared by the service and the client).
- `reply`: the messages of one answer, their pacing, and the window of publishes in flight.
- `service`: the service, the watcher of the broker's dropped counter, and the serve loop.
- `client`: `mqtt-backup restore`: asks over MQTT and streams the answer back.
"""

from mqtt_backup.restore.service import DroppedWatcher, RestoreService, ServeOptions, serve

__all__ = ["DroppedWatcher", "RestoreService", "ServeOptions", "serve"]
