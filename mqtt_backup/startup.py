"""What `mqtt-backup run` does before the bridge connects, side by side instead of in a row.

Kill -9 to ingesting again is mostly start-up (docs/design-notes.md, "Start-up"). Three parts
need nothing of each other until the bridge connects: importing the bridge's modules (Python,
holding the GIL), opening the store (RocksDB, which lets the GIL go while it reads and syncs),
and the client-id check (broker round trips and a 0.1 s grace). `Startup` runs the store and
the check on threads of their own while the caller imports the rest, and hands them over:

    startup = Startup(settings)           # the store opens on a thread
    startup.check_client_id()             # imports status.py here, then checks on a thread
    from mqtt_backup.bridge import Bridge
    Bridge(settings, startup=startup)     # takes the store; waits for the check in connect()

Errors come where they came before: a store error when the bridge is made, the check's when it
connects (after the metrics server). Modules are imported on the calling thread only: two
threads importing one package at once can see each other's modules half made.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from mqtt_backup.config import Settings
from mqtt_backup.errors import BackupError, UsageError
from mqtt_backup.storage.manifest import load_manifest, manifest_path
from mqtt_backup.storage.store import Store

if TYPE_CHECKING:
    from mqtt_backup.status import ClientIdCheck, Identity


class Startup:
    """The store, opening on a thread, and the client-id check, once started."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: Store | None = None
        self._failure: BaseException | None = None
        self._check: ClientIdCheck | None = None
        self._thread = threading.Thread(target=self._open, name="store-open", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        try:
            self._store = open_store(self.settings)
        except BaseException as exc:  # noqa: BLE001 - handed to `store()`, on the caller's thread
            self._failure = exc

    def store(self) -> Store:
        """The open store; its error (StorageError, UsageError) if it did not open."""
        self._thread.join()
        if self._failure is not None:
            self.cancel_check()
            raise self._failure
        assert self._store is not None
        return self._store

    def check_client_id(self) -> None:
        """Start the client-id check for the id the store will have, when that can be told."""
        client_id = known_client_id(self.settings)
        if client_id is not None:
            self._check = start_check(self.settings, client_id)

    def take_check(self, identity: Identity) -> ClientIdCheck:
        """The check for `identity` (the one started, or a new one when it was for another)."""
        check, self._check = self._check, None
        if check is not None and check.identity == identity:
            return check
        if check is not None:
            check.cancel()
        return start_check(self.settings, identity.client_id)

    def cancel_check(self) -> None:
        """Stop the check (the start failed before connecting)."""
        check, self._check = self._check, None
        if check is not None:
            check.cancel()


def identity(settings: Settings, client_id: str) -> Identity:
    """Who a bridge of these settings is on the status topic, under `client_id`."""
    from mqtt_backup.status import Identity  # noqa: PLC0415 - see the module docstring

    return Identity(settings.namespace, client_id, settings.group, settings.instance)


def start_check(settings: Settings, client_id: str) -> ClientIdCheck:
    """Start checking that no running bridge holds `client_id` (see status.py)."""
    from mqtt_backup.status import ClientIdCheck  # noqa: PLC0415 - see the module docstring

    s = settings
    return ClientIdCheck(s.broker_target, identity(s, client_id), s.keepalive)


def known_client_id(settings: Settings) -> str | None:
    """The client id `open_store` will give, when it can be told before opening (else None).

    Only a head start: `Startup.take_check` checks again if the store's id differs.
    """
    if settings.client_id:
        return settings.client_id
    try:
        return load_manifest(settings.data).client_id
    except BackupError:
        return settings.derived_client_id  # no (readable) manifest: opening says why, or makes one


def open_store(settings: Settings) -> Store:
    """The store, under the client id it was made with (a new one with --group and --instance).

    A data directory keeps its id: the broker holds the session (and what it queued) under it,
    so `mqtt-backup-<group>-<instance>` applies to a new directory, and a mismatch is refused.
    """
    derived = settings.derived_client_id
    if derived is None or not manifest_path(settings.data).exists():
        return Store.open(settings.data, settings.partitions, settings.client_id or derived)
    store = Store.open(settings.data, settings.partitions)
    if store.client_id != derived:
        store.close()
        raise UsageError(
            f"{settings.data} belongs to client id {store.client_id!r}, not {derived!r} "
            f"(--group {settings.group} --instance {settings.instance}); the broker keeps its "
            "session under the old id",
            f"add --client-id {store.client_id} to keep it, or use a new --data directory",
        )
    return store
