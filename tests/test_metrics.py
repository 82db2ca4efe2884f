"""/metrics and /healthz of a running bridge: the names operators alert on, and that they move."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mqtt_backup import metrics
from mqtt_backup.errors import UsageError
from tests.conftest import (
    BridgeThread,
    Broker,
    Sent,
    device_client,
    make_settings,
    publish,
    stored_count,
    wait_until,
)
from tools import devbroker

pytestmark = pytest.mark.usefixtures("transport")

# What deploy/grafana-dashboard.json and deploy/alerts.yaml build on (tests/test_deploy.py checks
# that they use no other name).
EXPORTED = {
    "mqtt_backup_messages_received_total",
    "mqtt_backup_messages_stored_total",
    "mqtt_backup_messages_acknowledged_total",
    "mqtt_backup_messages_skipped_total",
    "mqtt_backup_duplicates_total",
    "mqtt_backup_batches_total",
    "mqtt_backup_payload_bytes_total",
    "mqtt_backup_commit_seconds_total",
    "mqtt_backup_pending_messages",
    "mqtt_backup_connected",
    "mqtt_backup_storage_stalled",
    "mqtt_backup_gaps",
    "mqtt_backup_reconnects_total",
    "mqtt_backup_partition_bytes",
    "mqtt_backup_commit_duration_seconds_bucket",
    "mqtt_backup_commit_duration_seconds_sum",
    "mqtt_backup_commit_duration_seconds_count",
    "mqtt_backup_batch_messages_bucket",
    "mqtt_backup_batch_messages_sum",
    "mqtt_backup_batch_messages_count",
    "mqtt_backup_restores_total",
    "mqtt_backup_restore_messages_sent_total",
    "mqtt_backup_storage_stalls_total",
}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _restore(broker: Broker, device: str) -> dict[str, object]:
    async with device_client(broker) as client:
        await client.subscribe(f"backup/restore/{device}/response", qos=1)
        await client.publish(f"backup/restore/{device}", b"", qos=1)
        async with asyncio.timeout(20):
            async for message in client.messages:
                body: dict[str, object] = json.loads(bytes(message.payload))
                if "done" in body or "error" in body:
                    return body
    return {}


def test_the_metrics_move_with_ingest_and_restores(
    broker: Broker, data_dir: Path, unique: str
) -> None:
    port = devbroker.free_port()
    settings = make_settings(broker, data_dir, metrics_bind=f"127.0.0.1:{port}")
    bridge = BridgeThread(settings)
    try:
        wait_until(bridge.bridge.restore_listening.is_set, 20, "the restore service")
        before = scrape(port)
        assert {name for name, _ in before} >= EXPORTED
        assert {
            dict(labels)["partition"]
            for name, labels in before
            if name == "mqtt_backup_partition_bytes"
        } == {"p0", "p1", "p2"}
        publish(broker, [Sent(f"devices/{unique}/t", b"x" * 100) for _ in range(5)])
        wait_until(lambda: stored_count(data_dir) >= 5, 20, "the messages")
        assert asyncio.run(_restore(broker, unique))["count"] == 5
        wait_until(
            lambda: (
                value(scrape(port), "mqtt_backup_restores_total", outcome="done")
                > value(before, "mqtt_backup_restores_total", outcome="done")
            ),
            20,
            "the restore to be counted",
        )
        after = scrape(port)
    finally:
        bridge.stop()
    for name in (
        "mqtt_backup_messages_received_total",
        "mqtt_backup_messages_stored_total",
        "mqtt_backup_messages_acknowledged_total",
        "mqtt_backup_batches_total",
        "mqtt_backup_commit_duration_seconds_count",
        "mqtt_backup_batch_messages_sum",
    ):
        assert value(after, name) > value(before, name), name
    assert (
        value(after, "mqtt_backup_messages_stored_total")
        - value(before, "mqtt_backup_messages_stored_total")
        == 5
    )
    assert (
        value(after, "mqtt_backup_restore_messages_sent_total")
        - value(before, "mqtt_backup_restore_messages_sent_total")
        >= 5
    )
    assert value(after, "mqtt_backup_connected") == 1
    assert sum(v for (n, _), v in after.items() if n == "mqtt_backup_partition_bytes") > 0


def test_healthz_says_503_and_why_while_the_broker_is_away(
    own_broker: Broker, data_dir: Path
) -> None:
    port = devbroker.free_port()
    settings = make_settings(own_broker, data_dir, metrics_port=port)
    bridge = BridgeThread(settings)
    try:
        assert healthz(port) == (200, "ok: connected, storage writable\n")
        own_broker.stop()
        wait_until(lambda: healthz(port)[0] == 503, 30, "/healthz to report the lost broker")
        _, text = healthz(port)
        assert text.count("\n") == 1
        assert "not connected to the broker" in text
        own_broker.start()
        wait_until(lambda: healthz(port)[0] == 200, 60, "/healthz to recover")
        assert value(scrape(port), "mqtt_backup_reconnects_total") >= 1
    finally:
        bridge.stop()


def test_healthz_reports_a_storage_stall() -> None:
    snapshot = metrics.Snapshot(0, 0, 0, 0, 0, 0.0, 3, connected=True, storage_stalled=True, gaps=0)
    ok, reason = metrics.health(snapshot)
    assert not ok
    assert "storage is failing" in reason


def test_a_taken_metrics_port_is_a_usage_error(broker: Broker, data_dir: Path) -> None:
    port = devbroker.free_port()
    stop = metrics.serve(port, lambda: metrics.Snapshot(0, 0, 0, 0, 0, 0.0, 0, True, False, 0))
    try:
        with pytest.raises(UsageError, match=f"cannot serve metrics on 127.0.0.1:{port}") as caught:
            BridgeThread(make_settings(broker, data_dir, metrics_port=port))
        assert caught.value.exit_code == 2
    finally:
        stop()


def test_a_write_counts_as_hung_from_ten_seconds() -> None:
    # The bridge test turns WRITE_HUNG_S down to 1 s (to save the wait): the real bar is here.
    assert metrics.WRITE_HUNG_S == 10.0

    def waiting(seconds: float) -> metrics.Snapshot:
        return metrics.Snapshot(0, 0, 0, 0, 0, 0.0, 0, True, False, 0, write_seconds=seconds)

    assert metrics.health(waiting(9.9)) == (True, "ok: connected, storage writable")
    healthy, why = metrics.health(waiting(10.0))
    assert not healthy
    assert why.startswith("a storage write has not returned for 10 s")
