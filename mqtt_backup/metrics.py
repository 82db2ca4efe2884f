"""Prometheus metrics and `/healthz` (`run --metrics-port P`, `--metrics-bind HOST:PORT`).

The only module that imports prometheus_client. Values are read from the running bridge at
scrape time (and from `tally` for events), so the per-message path pays nothing. Names only ever
grow: a dashboard or an alert built on one keeps working (deploy/grafana-dashboard.json,
deploy/alerts.yaml, and tests/test_deploy.py checks that each name they use is exported here).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from mqtt_backup.errors import UsageError
from mqtt_backup.tally import TALLY, Counts, Histogram

PREFIX = "mqtt_backup_"


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
    received: int = 0
    acknowledged: int = 0
    reconnects: int = 0
    partition_bytes: Mapping[str, int] = field(default_factory=dict)
    broker_dropped: int | None = None  # None: $SYS not readable (yet)
    write_seconds: float = 0.0  # how long the storage write under way has been waiting


# A synced write of one batch takes milliseconds; one that takes this long is hung, not slow.
WRITE_HUNG_S = 10.0


def health(s: Snapshot) -> tuple[bool, str]:
    """Whether the bridge is doing its job, and one line saying why not."""
    if not s.connected:
        return False, "not connected to the broker (reconnecting; see the log)"
    if s.storage_stalled:
        return False, "storage is failing: messages are held unacknowledged (see the log)"
    if s.write_seconds >= WRITE_HUNG_S:
        return False, (
            f"a storage write has not returned for {s.write_seconds:.0f} s: messages are held "
            "unacknowledged (a dead disk, or a network filesystem gone?)"
        )
    return True, "ok: connected, storage writable"


class BridgeCollector(Collector):
    """Turns a Snapshot (and the tally) into Prometheus metric families."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        """Called by prometheus_client on each scrape."""
        s = self._snapshot()
        yield from _ingest(s)
        yield from _state(s)
        yield from _events(TALLY.counts())


def _ingest(s: Snapshot) -> Iterator[Any]:
    yield _counter("messages_received", "Messages received from the broker", s.received)
    yield _counter("messages_stored", "Messages stored with a synced WAL", s.stored)
    yield _counter(
        "messages_acknowledged",
        "Messages acknowledged to the broker (after storing)",
        s.acknowledged,
    )
    yield _counter(
        "messages_skipped",
        "Messages acknowledged unstored (own namespace, replays, no template)",
        s.skipped,
    )
    yield _counter("duplicates", "Redelivered copies stored (DUP flag)", s.duplicates)
    yield _counter("batches", "Group commits", s.batches)
    yield _counter("payload_bytes", "Payload bytes stored", s.payload_bytes)
    yield _counter("commit_seconds", "Time spent writing and syncing batches", s.commit_seconds)


def _state(s: Snapshot) -> Iterator[Any]:
    yield _gauge("pending_messages", "Backlog held: received, not yet stored and acked", s.pending)
    yield _gauge("connected", "1 while connected to the broker", int(s.connected))
    yield _gauge(
        "storage_stalled",
        "1 while storage fails (or a write hangs) and acks are held",
        int(s.storage_stalled or s.write_seconds >= WRITE_HUNG_S),
    )
    yield _gauge("gaps", "Spans recorded in the gap log", s.gaps)
    yield _counter("reconnects", "Connections to the broker after the first", s.reconnects)
    sizes = GaugeMetricFamily(
        PREFIX + "partition_bytes", "Bytes on disk per partition", labels=["partition"]
    )
    for name, size in sorted(s.partition_bytes.items()):
        sizes.add_metric([name], size)
    yield sizes
    if s.broker_dropped is not None:
        yield _gauge(
            "broker_dropped_messages",
            "The broker's $SYS/broker/publish/messages/dropped as last read (broker-wide)",
            s.broker_dropped,
        )


def _events(c: Counts) -> Iterator[Any]:
    yield _histogram(
        "commit_duration_seconds", "Time of one group commit (write + WAL sync)", c.commit_seconds
    )
    yield _histogram("batch_messages", "Messages stored per group commit", c.batch_messages)
    restores = CounterMetricFamily(
        PREFIX + "restores", "Restore requests answered, by terminal message", labels=["outcome"]
    )
    for outcome, count in sorted(c.restores.items()):
        restores.add_metric([outcome], count)
    yield restores
    yield _counter(
        "restore_messages_sent", "Stored messages sent in restore answers", c.restore_messages
    )
    yield _counter("storage_stalls", "Times storage started failing", c.storage_stalls)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets, running = [], 0
    for bound, count in zip((*h.bounds, float("inf")), h.counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return HistogramMetricFamily(PREFIX + name, doc, buckets=buckets, sum_value=h.total)


# ---- the HTTP server ----------------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Scrapes every few seconds are not news."""


def _app(registry: CollectorRegistry, snapshot: Callable[[], Snapshot]) -> Any:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        ok, reason = health(snapshot())
        body = (reason + "\n").encode("utf-8")
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app


def serve(
    port: int, snapshot: Callable[[], Snapshot], host: str = "127.0.0.1"
) -> Callable[[], None]:
    """Serve /metrics and /healthz on host:port in a daemon thread; returns what stops it.

    UsageError when the address is taken or cannot be bound.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(snapshot))
    server_class = type(
        "Server", (_Server,), {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET}
    )
    try:
        server: WSGIServer = make_server(host, port, _app(registry, snapshot), server_class, _Quiet)
    except OSError as exc:
        raise UsageError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
            "choose a free --metrics-port (or --metrics-bind HOST:PORT)",
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop
