"""Prometheus metrics (`run --metrics-port P`): the only module that imports prometheus_client.

Values are read from the running bridge at scrape time, so the per-message path pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mqtt_backup.errors import UsageError


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a scrape reports, taken from the bridge at that moment."""

    stored: int
    skipped: int
    duplicates: int
    batches: int
    payload_bytes: int
    commit_seconds: float
    pending: int
    connected: bool
    storage_stalled: bool
    gaps: int


class BridgeCollector(Collector):
    """Turns a Snapshot into Prometheus metric families."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        """Called by prometheus_client on each scrape."""
        s = self._snapshot()
        yield _counter("messages_stored", "Messages stored with a synced WAL", s.stored)
        yield _counter(
            "messages_skipped",
            "Messages acknowledged unstored (own namespace, replays, no template)",
            s.skipped,
        )
        yield _counter("duplicates", "Redelivered copies stored (DUP flag)", s.duplicates)
        yield _counter("batches", "Group commits", s.batches)
        yield _counter("payload_bytes", "Payload bytes stored", s.payload_bytes)
        yield _counter("commit_seconds", "Time spent writing and syncing batches", s.commit_seconds)
        yield _gauge("pending_messages", "Messages received, not yet stored", s.pending)
        yield _gauge("connected", "1 while connected to the broker", int(s.connected))
        yield _gauge(
            "storage_stalled", "1 while storage fails and acks are held", int(s.storage_stalled)
        )
        yield _gauge("gaps", "Spans recorded in the gap log", s.gaps)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"mqtt_backup_{name}", doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"mqtt_backup_{name}", doc, value=value)


def serve(
    port: int, snapshot: Callable[[], Snapshot], host: str = "127.0.0.1"
) -> Callable[[], None]:
    """Serve /metrics on host:port in a daemon thread; returns the function that stops it.

    UsageError when the port is taken.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(snapshot))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UsageError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
            "choose a free --metrics-port",
        ) from exc
    return server.shutdown
