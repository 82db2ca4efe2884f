"""mosquitto/production.conf and mosquitto/acl, run unchanged but for the port and file places.

The broker gets throwaway certificates (openssl), passwords (mosquitto_passwd) and the project's
acl file. It proves: a device can neither obtain another's history nor have its own delivered
where it must not go; the bridge's user can do all it needs; an operator may restore any device.
Also mutual TLS on the TLS listener with a client-certificate requirement, on both transports,
and the system CAs when --ca is absent.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_backup.config import Settings
from mqtt_backup.errors import BrokerUnreachable
from tests.conftest import (
    BridgeThread,
    Broker,
    make_settings,
    make_test_ca,
    read_all,
    stored_count,
    wait_until,
)
from tools import devbroker

BRIDGE, OPERATOR = "mqtt-backup", "operator"
PASSWORDS = {BRIDGE: "bridge-pw:/@", OPERATOR: "operator-pw", "dev-a": "a-pw", "dev-b": "b-pw"}


class ProductionBroker(Broker):
    """mosquitto/production.conf with its files (passwd, acl, certs) in the state directory."""

    @property
    def url(self) -> str:
        """Its TLS listener."""
        return f"mqtts://127.0.0.1:{self.port}"

    def launch(self) -> subprocess.Popen[bytes]:
        """Start from production.conf, its file options moved into the state directory."""
        return devbroker.start(self.conf, self.port, self.state_dir, relocate_files=True)


def _passwords(state: Path) -> None:
    path = state / "passwd"
    for i, (user, password) in enumerate(PASSWORDS.items()):
        flags = ["-b", "-c"] if i == 0 else ["-b"]
        subprocess.run(
            ["mosquitto_passwd", *flags, str(path), user, password], check=True, capture_output=True
        )


@pytest.fixture(scope="module")
def prod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionBroker]:
    state = tmp_path_factory.mktemp("production-broker")
    make_test_ca(state)
    _passwords(state)
    shutil.copy(devbroker.CONF_DIR / "acl", state / "acl")
    broker = ProductionBroker("production.conf", state)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_the_rendered_config_is_production_conf_with_only_port_and_places_changed(
    prod: ProductionBroker,
) -> None:
    rendered = (prod.state_dir / "mosquitto.conf").read_text(encoding="utf-8").splitlines()
    assert f"acl_file {prod.state_dir}/acl" in rendered
    assert f"password_file {prod.state_dir}/passwd" in rendered
    original = (devbroker.CONF_DIR / "production.conf").read_text(encoding="utf-8")
    placed: tuple[str, ...] = ("listener", "persistence_location", "password_file", "acl_file")
    placed += ("cafile", "certfile", "keyfile", "user")  # user: the test runs it as itself
    settings = [line for line in original.splitlines() if line and not line.startswith("#")]
    assert [line for line in settings if not line.startswith(placed)] == [
        line for line in rendered if line and not line.startswith(("#", *placed))
    ]


# ---- clients --------------------------------------------------------------------------------


def _client(broker: ProductionBroker, user: str | None, **options: Any) -> aiomqtt.Client:
    if user is not None:
        options.update(username=user, password=PASSWORDS[user])
    options.setdefault(
        "tls_params", aiomqtt.TLSParameters(ca_certs=str(broker.state_dir / "ca.crt"))
    )
    return aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5, **options)


def _request_props(response_topic: str | None = None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        props.ResponseTopic = response_topic
    return props


async def _ask(
    broker: ProductionBroker,
    user: str,
    device: str,
    request: dict[str, Any],
    *,
    listen: str,
    response_topic: str | None = None,
) -> list[dict[str, Any]]:
    """As `user`: subscribe to `listen`, request `device`'s history, read until a terminal."""
    answers: list[dict[str, Any]] = []
    async with _client(broker, user) as client:
        await client.subscribe(listen, qos=1)
        await client.publish(
            f"backup/restore/{device}",
            json.dumps(request),
            qos=1,
            properties=_request_props(response_topic),
        )
        async with asyncio.timeout(20):
            async for message in client.messages:
                if str(message.topic) == f"backup/restore/{device}":
                    continue  # our own request, heard through the wildcard
                body = json.loads(bytes(message.payload))
                answers.append({"topic": str(message.topic), **body})
                if body.get("id") == request.get("id") and ("done" in body or "error" in body):
                    return answers
    return answers


async def _watch(broker: ProductionBroker, user: str, until: Callable[[], Any]) -> list[str]:
    """As `user` subscribed to `#`: every topic delivered while `until()` runs, then a barrier.

    The barrier: `user` (a device) asks for its own history and waits for the terminal. The
    broker delivers to one client in order, so whatever `until()` made it send came before.
    """
    seen: list[str] = []
    async with _client(broker, user) as client:
        await client.subscribe("#", qos=1)
        await until()
        await client.publish(f"backup/restore/{user}", json.dumps({"id": "barrier"}), qos=1)
        async with asyncio.timeout(20):
            async for message in client.messages:
                seen.append(str(message.topic))
                body = json.loads(bytes(message.payload))
                if body.get("id") == "barrier" and "done" in body:
                    return seen
    return seen


async def _publish(broker: ProductionBroker, user: str, topic: str, payload: bytes) -> None:
    async with _client(broker, user) as client:
        await client.publish(topic, payload, qos=1)


def _bridge_settings(
    prod: ProductionBroker, data: Path, tmp_path: Path, **changes: Any
) -> Settings:
    secret = tmp_path / "bridge-password"
    secret.write_text(PASSWORDS[BRIDGE] + "\n", encoding="utf-8")
    return make_settings(
        prod,
        data,
        broker=f"mqtts://{BRIDGE}@127.0.0.1:{prod.port}",
        password_file=secret,
        ca=prod.state_dir / "ca.crt",
        **changes,
    )


@pytest.fixture
def bridge(
    prod: ProductionBroker,
    data_dir: Path,
    tmp_path: Path,
    transport: str,  # noqa: ARG001 - on both ingest transports
) -> Iterator[BridgeThread]:
    """A bridge logged in as the bridge's user, with two devices' telemetry stored."""
    running = BridgeThread(_bridge_settings(prod, data_dir, tmp_path))
    wait_until(running.bridge.restore_listening.is_set, 20, "the restore service")
    for device in ("dev-a", "dev-b"):
        asyncio.run(_publish(prod, device, f"devices/{device}/t", f"{device} secret".encode()))
    wait_until(lambda: stored_count(data_dir) >= 2, 20, "both devices' telemetry stored")
    try:
        yield running
    finally:
        running.stop()


# ---- the ACL --------------------------------------------------------------------------------


@pytest.mark.usefixtures("bridge")
def test_a_device_cannot_obtain_another_devices_history(prod: ProductionBroker) -> None:
    async def try_everything() -> None:
        # Ask for dev-b's history outright, and with a response topic of its own.
        async with _client(prod, "dev-a") as client:
            await client.publish("backup/restore/dev-b", json.dumps({"id": "x"}), qos=1)
            await client.publish(
                "backup/restore/dev-b",
                json.dumps({"id": "y"}),
                qos=1,
                properties=_request_props("backup/restore/dev-a/mine"),
            )
        # An operator's legitimate restore of dev-b goes on meanwhile: dev-a sees none of it.
        answers = await _ask(prod, OPERATOR, "dev-b", {"id": "op"}, listen="backup/restore/dev-b/#")
        assert answers[-1]["done"] is True
        assert answers[-1]["count"] == 1

    seen = asyncio.run(_watch(prod, "dev-a", try_everything))
    assert not [t for t in seen if "dev-b" in t], seen
    # What dev-a did see: its own barrier request and its answer, and the bridges' status (which
    # every device may read: a restore client learns the live instances from it).
    own = {t for t in seen if not t.startswith("backup/status/")}
    assert own == {"backup/restore/dev-a", "backup/restore/dev-a/response"}, seen


@pytest.mark.usefixtures("bridge")
def test_a_devices_history_goes_nowhere_else(prod: ProductionBroker) -> None:
    async def dev_a_asks_for_its_own_elsewhere() -> None:
        for topic in ("backup/restore/dev-b/stolen", "devices/dev-b/t", "public/x"):
            answers = await _ask(
                prod,
                "dev-a",
                "dev-a",
                {"id": topic},
                listen="backup/restore/dev-a/#",
                response_topic=topic,
            )
            # Refused, and the refusal goes to dev-a's own default topic; nothing else is sent.
            assert [a["topic"] for a in answers] == ["backup/restore/dev-a/response"], answers
            assert "response topic" in answers[0]["error"]
        answers = await _ask(prod, "dev-a", "dev-a", {"id": "own"}, listen="backup/restore/dev-a/#")
        assert [a.get("payload") for a in answers][:1] == ["dev-a secret"]

    seen = asyncio.run(_watch(prod, "dev-b", dev_a_asks_for_its_own_elsewhere))
    assert not [t for t in seen if "dev-a" in t], seen


def test_a_device_cannot_write_answers_status_nor_others_telemetry(
    prod: ProductionBroker,
) -> None:
    async def watch() -> tuple[list[str], list[str]]:
        on_backup: list[str] = []
        on_devices: list[str] = []
        async with _client(prod, OPERATOR) as operator, _client(prod, BRIDGE) as bridge:
            await operator.subscribe("backup/#", qos=1)
            await bridge.subscribe("devices/#", qos=1)
            async with _client(prod, "dev-a") as device:
                for topic in (
                    "backup/restore/dev-b/response",
                    "backup/restore/dev-a/response",
                    "backup/status/default/x",
                    "devices/dev-b/t",
                ):
                    await device.publish(topic, b'{"done": true}', qos=1)
                # Barriers: what dev-a may publish. One client's messages are routed in order,
                # so a forged one that got through would arrive before them.
                await device.publish("devices/dev-a/t", b"own", qos=1)
                await device.publish("backup/restore/dev-a", b"", qos=1)
            async with asyncio.timeout(20):
                async for message in bridge.messages:
                    on_devices.append(str(message.topic))
                    if str(message.topic) == "devices/dev-a/t":
                        break
                async for message in operator.messages:
                    if message.retain:
                        continue  # the running bridges' own retained status, from before
                    on_backup.append(str(message.topic))
                    if str(message.topic) == "backup/restore/dev-a":
                        break
        return on_backup, on_devices

    on_backup, on_devices = asyncio.run(watch())
    assert on_devices == ["devices/dev-a/t"]
    assert on_backup == ["backup/restore/dev-a"]


def test_anonymous_clients_are_refused(prod: ProductionBroker) -> None:
    async def connect() -> None:
        async with _client(prod, None):
            pass

    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(connect())


def test_the_operator_may_request_any_devices_history(
    prod: ProductionBroker, bridge: BridgeThread
) -> None:
    for device in ("dev-a", "dev-b"):
        answers = asyncio.run(
            _ask(prod, OPERATOR, device, {"id": device}, listen=f"backup/restore/{device}/#")
        )
        assert answers[0]["payload"] == f"{device} secret"
        assert answers[-1]["done"] is True
        # Broker drops are known: the bridge's user may read $SYS's dropped counter.
        assert "broker_drops" not in answers[-1], answers[-1]
    assert bridge.bridge.snapshot().connected


@pytest.mark.usefixtures("bridge")
def test_the_bridges_user_stores_answers_and_replays(prod: ProductionBroker) -> None:
    async def replay() -> list[dict[str, Any]]:
        replayed: list[str] = []
        async with _client(prod, OPERATOR) as device:
            await device.subscribe("devices/dev-a/#", qos=1)
            answers = await _ask(
                prod,
                "dev-a",
                "dev-a",
                {"id": "r", "mode": "replay"},
                listen="backup/restore/dev-a/#",
            )
            async with asyncio.timeout(20):
                async for message in device.messages:
                    replayed.append(bytes(message.payload).decode())
                    break
        return [*answers, {"replayed": replayed}]

    answers = asyncio.run(replay())
    assert answers[-2]["done"] is True
    assert answers[-1]["replayed"] == ["dev-a secret"]


def test_the_bridges_user_writes_its_status(prod: ProductionBroker) -> None:
    async def status() -> str:
        async with _client(prod, BRIDGE) as bridge:
            await bridge.publish(
                "backup/status/default/x", b'{"state": "online"}', qos=1, retain=True
            )
        async with _client(prod, OPERATOR) as operator:
            await operator.subscribe("backup/status/default/x", qos=1)
            async with asyncio.timeout(20):
                async for message in operator.messages:
                    return bytes(message.payload).decode()
        return ""

    assert json.loads(asyncio.run(status())) == {"state": "online"}


def test_the_bridge_reads_the_brokers_dropped_counter(bridge: BridgeThread) -> None:
    wait_until(
        lambda: bridge.bridge.snapshot().broker_dropped is not None,
        30,
        "the $SYS dropped counter (read access for the bridge's user)",
    )


@pytest.mark.usefixtures("bridge")
def test_the_stored_history_came_through_the_acl(data_dir: Path) -> None:
    stored = read_all(data_dir)
    assert [m.record.payload for m in stored["dev-a"]] == [b"dev-a secret"]
    assert [m.record.payload for m in stored["dev-b"]] == [b"dev-b secret"]


# ---- mutual TLS -----------------------------------------------------------------------------


def _client_certificate(ca_dir: Path, name: str) -> tuple[Path, Path]:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=ca_dir, check=True, capture_output=True)

    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2")  # fmt: skip
    return ca_dir / f"{name}.crt", ca_dir / f"{name}.key"


@pytest.mark.usefixtures("transport")
def test_mutual_tls_with_a_client_certificate(
    mtls_broker: Broker, data_dir: Path, unique: str
) -> None:
    cert, key = _client_certificate(mtls_broker.state_dir, f"bridge-{unique}")
    ca = mtls_broker.state_dir / "ca.crt"
    settings = make_settings(mtls_broker, data_dir, ca=ca, cert=cert, key=key)
    bridge = BridgeThread(settings)
    wait_until(bridge.bridge.restore_listening.is_set, 20, "the restore service over mTLS")

    async def send() -> None:
        tls = aiomqtt.TLSParameters(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        async with aiomqtt.Client("127.0.0.1", mtls_broker.port, tls_params=tls) as client:
            await client.publish(f"devices/{unique}/t", b"over mTLS", qos=1)

    asyncio.run(send())
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "the message over mTLS")
    bridge.stop()
    assert [m.record.payload for m in read_all(data_dir)[unique]] == [b"over mTLS"]


@pytest.mark.usefixtures("transport")
def test_mutual_tls_without_a_client_certificate_is_refused(
    mtls_broker: Broker, data_dir: Path
) -> None:
    settings = make_settings(mtls_broker, data_dir, ca=mtls_broker.state_dir / "ca.crt")
    with pytest.raises(BrokerUnreachable):
        BridgeThread(settings)


# ---- system CAs ---------------------------------------------------------------------------


@pytest.mark.usefixtures("transport")
def test_without_ca_the_system_trust_store_is_used(
    tls_broker: Broker, data_dir: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OpenSSL's default verify paths honour SSL_CERT_FILE: standing in for /etc/ssl/certs, it
    # holds the test CA. Without --ca the bridge must trust it (and with the real system store,
    # a public CA's broker).
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_broker.state_dir / "ca.crt"))
    settings = make_settings(tls_broker, data_dir)
    assert settings.ca is None
    bridge = BridgeThread(settings)
    wait_until(bridge.bridge.restore_listening.is_set, 20, "the restore service over TLS")

    async def send() -> None:
        tls = aiomqtt.TLSParameters(ca_certs=str(tls_broker.state_dir / "ca.crt"))
        async with aiomqtt.Client("127.0.0.1", tls_broker.port, tls_params=tls) as client:
            await client.publish(f"devices/{unique}/t", b"system CA", qos=1)

    asyncio.run(send())
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "the message over TLS")
    bridge.stop()
