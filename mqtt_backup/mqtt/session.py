"""What both ingest transports share, and what the bridge gives them: no MQTT client library.

`Session` (who the bridge is and how it connects), `Presence` (its retained status), `Sink` (the
commit pipeline as the network side sees it), `Hooks` (what the bridge hears), `Stall` (backoff
while storage fails). The asyncio transport (`async_ingest`) and the paho one (`ingest`) import
them from here, so that `mqtt-backup run` on the default transport never loads paho
(docs/design-notes.md, "Start-up").
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mqtt_backup.config import BrokerAddress, BrokerTarget, TlsFiles
from mqtt_backup.errors import (
    BrokerUnreachable,
    ConfigError,
    SessionTakenOver,
    StorageUnavailable,
)
from mqtt_backup.mqtt.backoff import Backoff
from mqtt_backup.records import Record
from mqtt_backup.tally import TALLY

log = logging.getLogger("mqtt_backup.mqtt.ingest")  # the name its lines always had

REPLAY_PROPERTY = "mqtt-backup-replay"
CONNECT_TIMEOUT_S = 10.0
# Smaller than every broker's window of unacknowledged messages (Mosquitto's default is 20).
CAUGHT_UP_BELOW = 16


@dataclass(frozen=True, slots=True)
class Presence:
    """The bridge's retained status: `online` after each connect, `offline` as will and at stop."""

    topic: str
    online: bytes
    offline: bytes


# MQTT 5 DISCONNECT reason: another connection with our client id took the session.
SESSION_TAKEN_OVER = 0x8E


def taken_over(client_id: str) -> SessionTakenOver:
    """The error of a bridge whose session another connection took (it must not reconnect)."""
    return SessionTakenOver(
        f"the broker gave session {client_id} to a new connection with the same client id "
        "(reason 0x8E): another bridge runs with it",
        "stop one of them; each instance needs its own --instance (or --client-id) and --data",
    )


@dataclass(frozen=True, slots=True)
class Session:
    """How the bridge connects: to which broker, as whom, how long the broker keeps its session."""

    target: BrokerTarget
    client_id: str
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    receive_maximum: int = 1000
    presence: Presence | None = None

    @property
    def address(self) -> BrokerAddress:
        """The broker's address (its URL without the password is what logs show)."""
        return self.target.address


class Sink(Protocol):
    """What the transport feeds: the commit pipeline, seen from the network side."""

    @property
    def pending(self) -> int:
        """Messages received, not yet stored."""

    @property
    def has_work(self) -> bool:
        """Something waits to be stored or acknowledged."""

    def offer(self, record: Record, token: object | None, replayed: bool = False) -> None:
        """Take one message."""

    def full(self) -> bool:
        """The batch reached its size limit."""

    def due(self) -> bool:
        """The batch should close now."""

    def seconds_left(self) -> float:
        """How long the open batch may wait."""

    def commit(self) -> int:
        """Store and acknowledge the batch; StorageUnavailable when storage fails."""

    def drop_tokens(self, keep: Callable[[object], bool]) -> None:
        """Forget tokens of a closed connection."""

    def new_connection(self) -> int:
        """Messages from now on come over a new connection (held ones stay held); its number."""

    def can_hold(self) -> bool:
        """Room to hold more messages while storage fails."""

    def caught_up(self, at_ns: int) -> None:
        """Everything the broker had sent by `at_ns` is stored and acknowledged."""


class Hooks(Protocol):
    """What the bridge wants to hear from the transport."""

    def connected(self, session_present: bool, subscribed: Sequence[str]) -> None:
        """A connection is up and subscribed."""

    def disconnected(self, reason: str) -> None:
        """The connection was lost."""

    def tick(self) -> None:
        """Called every loop turn, for periodic work."""


def no_answer(address: BrokerAddress | str, what: str) -> BrokerUnreachable:
    """The broker took the TCP connection, then said nothing: most often not an MQTT listener."""
    return BrokerUnreachable(
        f"no {what} from {address} within {CONNECT_TIMEOUT_S:g} s",
        "check that --broker names an MQTT listener (mqtts:// for a TLS port; WebSocket "
        "listeners are not supported) and that the broker is not overloaded",
    )


def describe(exc: BaseException) -> str:
    """The useful part of a socket or TLS error, on one line."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and not isinstance(exc, socket.gaierror) and exc.errno:
        # asyncio's own text ("Connect call failed ('127.0.0.1', 1883)") repeats the address.
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def tls_context(files: TlsFiles) -> ssl.SSLContext:
    """The TLS context of an mqtts:// connection; ConfigError naming the file that does not load.

    Every connection takes it (paho's too, through `tls_set_context`), so every command says
    the same thing about the same files.
    """
    try:
        context = ssl.create_default_context(cafile=files.ca)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        what = f"CA file {files.ca}" if files.ca else "the system's CA certificates"
        raise ConfigError(f"cannot load the TLS files: {what}: {describe(exc)}") from exc
    if files.cert is not None:
        try:
            context.load_cert_chain(files.cert, files.key)
        except (OSError, ValueError) as exc:
            key = f" with key {files.key}" if files.key else ""
            raise ConfigError(
                f"cannot load the TLS files: client certificate {files.cert}{key}: {describe(exc)}"
            ) from exc
    return context


class Stall:
    """Backoff state while storage fails: when to retry, and saying so once, not per message."""

    def __init__(self) -> None:
        self.active = False
        self._retry_at = 0.0
        self._backoff = Backoff()

    def seconds_left(self) -> float:
        """Time until the next retry."""
        return max(0.0, self._retry_at - time.monotonic())

    def failed(self, exc: StorageUnavailable) -> None:
        """A commit failed: log it the first time, schedule the next try."""
        if not self.active:
            TALLY.storage_stalled()
            log.error(
                "storage failed: %s. Not acknowledging or reading more; the broker keeps the "
                "messages. Retrying by itself.",
                exc.detail,
            )
        self.active = True
        self._retry_at = time.monotonic() + self._backoff.next()

    def cleared(self) -> None:
        """A commit worked: back to normal."""
        self.active = False
        self._backoff.reset()
