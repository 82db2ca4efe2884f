"""`--group/--instance` on the wire and on disk: SUBSCRIBE bytes, the client id a data dir keeps.

The bytes come from a recording peer (tests/wirebroker.py): no-local must be off on a shared
subscription (MQTT-3.8.3-4), which a tolerant Mosquitto would never show.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mqtt_backup import config
from mqtt_backup.bridge import Bridge
from mqtt_backup.errors import ConfigError, SessionTakenOver, UsageError
from mqtt_backup.storage.manifest import load_manifest
from tests.conftest import TRANSPORT_ENV, BridgeThread, wait_until
from tests.wirebroker import SUBSCRIBE, WireBroker

pytestmark = pytest.mark.usefixtures("transport")

# QoS 1 (0x01), retain-as-published (0x08), retain handling 1 (0x10); no-local is 0x04.
SHARED_OPTIONS = 0x19
PLAIN_OPTIONS = 0x1D


def subscribe_bytes(topic_filter: str, options: int, packet_id: int = 1) -> bytes:
    """An MQTT 5 SUBSCRIBE of one filter without properties."""
    encoded = topic_filter.encode()
    body = packet_id.to_bytes(2, "big") + b"\x00" + len(encoded).to_bytes(2, "big") + encoded
    body += bytes([options])
    return bytes([0x82, len(body)]) + body


@pytest.fixture
def wire() -> Iterator[WireBroker]:
    """A recording MQTT peer."""
    peer = WireBroker()
    yield peer
    peer.close()


def settings_on(wire: WireBroker, data: Path, **changes: Any) -> config.Settings:
    """Small settings against the recording peer, with the transport under test."""
    base = config.Settings(
        broker=wire.url,
        data=data,
        partitions=2,
        keepalive=10,
        transport=config.Transport(os.environ[TRANSPORT_ENV]),
    )
    return config.with_overrides(base, **changes)


def first_subscribe(
    wire: WireBroker, settings: config.Settings, start: Callable[..., BridgeThread]
) -> tuple[str, bytes]:
    """Start a bridge against the peer; (its client id, the first SUBSCRIBE it sent)."""
    bridge = start(settings)
    client_id = bridge.bridge.store.client_id
    wait_until(lambda: bool(wire.peer(client_id).of_type(SUBSCRIBE)), 10, "a SUBSCRIBE")
    return client_id, wire.peer(client_id).of_type(SUBSCRIBE)[0]


def test_a_group_subscribes_shared_without_no_local(
    wire: WireBroker, data_dir: Path, run_bridge: Callable[..., BridgeThread]
) -> None:
    settings = settings_on(wire, data_dir, group="g1", instance="a")
    client_id, sent = first_subscribe(wire, settings, run_bridge)
    assert client_id == "mqtt-backup-g1-a"
    assert sent == subscribe_bytes("$share/g1/devices/+/#", SHARED_OPTIONS)


def test_without_a_group_nothing_changes(
    wire: WireBroker, data_dir: Path, run_bridge: Callable[..., BridgeThread]
) -> None:
    settings = settings_on(wire, data_dir, client_id="plain-1")
    client_id, sent = first_subscribe(wire, settings, run_bridge)
    assert client_id == "plain-1"
    assert sent == subscribe_bytes("devices/+/#", PLAIN_OPTIONS)


def test_a_data_dir_keeps_the_client_id_it_was_made_with(
    wire: WireBroker, data_dir: Path, run_bridge: Callable[..., BridgeThread]
) -> None:
    run_bridge(settings_on(wire, data_dir, group="g1", instance="a")).stop()
    assert load_manifest(data_dir).client_id == "mqtt-backup-g1-a"
    with pytest.raises(UsageError) as refused:
        Bridge(settings_on(wire, data_dir, group="g1", instance="b"))
    message = refused.value.message()
    assert "belongs to client id 'mqtt-backup-g1-a', not 'mqtt-backup-g1-b'" in message
    assert "Try: add --client-id mqtt-backup-g1-a to keep it" in message
    # The refusal left the directory as it was, and an explicit client id is still the way on.
    assert load_manifest(data_dir).client_id == "mqtt-backup-g1-a"
    again = settings_on(wire, data_dir, group="g1", instance="b", client_id="mqtt-backup-g1-a")
    run_bridge(again).stop()


def test_a_group_without_an_instance_keeps_the_generated_id(
    wire: WireBroker, data_dir: Path, run_bridge: Callable[..., BridgeThread]
) -> None:
    client_id, sent = first_subscribe(wire, settings_on(wire, data_dir, group="g2"), run_bridge)
    assert client_id.startswith("mqtt-backup-")
    assert sent == subscribe_bytes("$share/g2/devices/+/#", SHARED_OPTIONS)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        ({"group": "a/b"}, "--group: 'a/b' must be 1 to 64 letters"),
        ({"instance": "x+"}, "--instance: 'x+' must be 1 to 64 letters"),
        ({"group": "default"}, "--group default names the bridges without a group"),
    ],
)
def test_bad_group_settings_are_refused(flags: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config.load(flags, {})
    assert says in refused.value.message()


def test_group_and_instance_come_from_env_and_file(tmp_path: Path) -> None:
    env = {"MQTT_BACKUP_GROUP": "fleet", "MQTT_BACKUP_INSTANCE": "b2"}
    assert config.load({}, env).derived_client_id == "mqtt-backup-fleet-b2"
    toml = tmp_path / "c.toml"
    toml.write_text('group = "fleet"\ninstance = "b3"\n', encoding="utf-8")
    assert config.load({}, {}, toml).derived_client_id == "mqtt-backup-fleet-b3"
    assert config.load({"client_id": "mine"}, env).derived_client_id is None


def test_a_session_taken_over_ends_the_bridge_with_a_clear_error(
    wire: WireBroker, data_dir: Path, run_bridge: Callable[..., BridgeThread]
) -> None:
    bridge = run_bridge(settings_on(wire, data_dir, client_id="t1"))
    wait_until(lambda: bool(wire.peer("t1").of_type(SUBSCRIBE)), 10, "a SUBSCRIBE")
    connections = sum(1 for p in wire.peers if p.client_id == "t1")
    wire.peer("t1").take_over()
    wait_until(lambda: bridge.error is not None, 10, "the bridge to end")
    with pytest.raises(SessionTakenOver) as ended:
        bridge.stop()
    assert ended.value.message() == (
        "another connection took the bridge's broker session: the broker gave session t1 to a "
        "new connection with the same client id (reason 0x8E): another bridge runs with it. "
        "Try: stop one of them; each instance needs its own --instance (or --client-id) and "
        "--data"
    )
    # It did not connect again to take the session back.
    assert sum(1 for p in wire.peers if p.client_id == "t1") == connections
