"""Shared fixtures: a real Mosquitto from the project's own config, real RocksDB in temp dirs.

Each test gets its own data directory and should use its own topics (`unique` fixture), so a
session-wide broker can serve them all.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import hypothesis
import pytest
from _pytest.mark.expression import Expression

from mqtt_backup import config
from mqtt_backup.bridge import Bridge
from mqtt_backup.mqtt import backoff
from mqtt_backup.storage import StoredMessage, StoreReader, ballast
from tools import devbroker

REPO = Path(__file__).resolve().parent.parent

# Whether this run leaves out the tests marked slow (`make test-fast`): see `examples`.
_FAST_RUN = False


def pytest_configure(config: pytest.Config) -> None:
    """Note a fast run (`-m "not slow"`) before the test modules are imported."""
    global _FAST_RUN  # noqa: PLW0603 - read by `examples` while the test modules are imported
    _FAST_RUN = leaves_out_slow(str(config.getoption("markexpr", default="") or ""))
    if _FAST_RUN:  # properties without a count of their own: 20 examples, not Hypothesis's 100
        hypothesis.settings.register_profile("fast", max_examples=20)
        hypothesis.settings.load_profile("fast")


def leaves_out_slow(markexpr: str) -> bool:
    """Whether `-m markexpr` runs an unmarked test but not one marked slow (`make test-fast`).

    The expression is evaluated as pytest does (`not slow and not serial` is a fast run too;
    `serial` alone, or `not serial`, is not). pytest's Expression is not public API: if it
    moves, this fails loudly rather than guessing from the text.
    """
    if not markexpr.strip():
        return False
    expression = Expression.compile(markexpr)

    def selected(*marks: str) -> bool:
        return expression.evaluate(lambda name, /, **_kwargs: name in marks)

    return selected() and not selected("slow")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A `serial` test must be `slow` too: `make test-fast` spreads what it runs over workers.

    The slow tests run first (in collection order otherwise): pytest-xdist hands tests out in
    this order as workers free up, and a long test handed out last left the other worker idle
    for its whole run (the unit kill test and the browser tests, collected near the end, did);
    ending on the many short tests evens out the finish.
    """
    lone = [
        i.nodeid
        for i in items
        if i.get_closest_marker("serial") and not i.get_closest_marker("slow")
    ]
    if lone:
        raise pytest.UsageError(f"marked serial but not slow (mark them slow too): {lone}")
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow first


def examples(full: int) -> int:
    """Hypothesis examples for a property: all of `full` in `make test`, a fifth in a fast run.

    Every property still runs in `make test-fast` (at least 10 examples, a fresh random draw each
    run); the full counts, and the shrinking they feed, are `make test`'s.
    """
    return full if not _FAST_RUN else max(10, full // 5)


@dataclass
class Broker:
    """A Mosquitto started from mosquitto/<conf> on a free port; can be stopped and restarted."""

    conf: str
    state_dir: Path
    overlays: tuple[str, ...] = ()
    port: int = field(default_factory=devbroker.free_port)
    proc: subprocess.Popen[bytes] | None = None
    ran: bool = False

    @property
    def url(self) -> str:
        """The bridge's --broker value for this broker."""
        scheme = "mqtts" if "tls.conf" in self.overlays else "mqtt"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (again) on the same port and state directory.

        Until it first ran, a port that another process took between `free_port` and mosquitto's
        bind (another pytest-xdist worker's broker, say) is traded for a new free one. A restart
        keeps its port, where the bridge under test reconnects: taken, it fails (PortTaken).
        """
        tries = 1 if self.ran else 5
        for tried in range(1, tries + 1):
            try:
                self.proc = self.launch()
            except devbroker.PortTaken:
                if tried == tries:
                    raise
                self.port = devbroker.free_port()
            else:
                break
        self.ran = True

    def launch(self) -> subprocess.Popen[bytes]:
        """Run mosquitto on `port` (devbroker.PortTaken when another process listens there)."""
        return devbroker.start(self.conf, self.port, self.state_dir, overlays=self.overlays)

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its persistence file on the way out."""
        if self.proc is not None:
            devbroker.stop(self.proc)
            self.proc = None

    def wipe(self) -> None:
        """Forget everything the broker persisted (sessions, queues): a broker that lost state."""
        self.stop()
        for item in self.state_dir.glob("*.db"):
            item.unlink()


class ContainerBroker(Broker):
    """The same broker config in the eclipse-mosquitto:2 image, for machines with Docker only."""

    container: Any = None

    def start(self) -> None:
        """Run the container with the rendered config and the state dir mounted; fixed host port."""
        from testcontainers.core.container import DockerContainer  # noqa: PLC0415 - optional

        conf_dir = self.state_dir / "config"
        conf_dir.mkdir(parents=True, exist_ok=True)
        rendered = devbroker.render_config(
            devbroker.CONF_DIR / self.conf,
            1883,
            "/mosquitto/data",
            bind="0.0.0.0",
            as_user=False,
            overlays=[devbroker.CONF_DIR / o for o in self.overlays],
        )
        (conf_dir / "mosquitto.conf").write_text(rendered, encoding="utf-8")
        self.container = (
            DockerContainer("eclipse-mosquitto:2")
            .with_bind_ports(1883, self.port)
            .with_volume_mapping(str(conf_dir), "/mosquitto/config", "ro")
            .with_volume_mapping(str(self.state_dir), "/mosquitto/data", "rw")
        )
        self.container.start()
        wait_until(lambda: devbroker.port_open(self.port), 30, "the mosquitto container")

    def stop(self) -> None:
        """Stop and remove the container (its persistence stays in the mounted state dir)."""
        if self.container is not None:
            self.container.stop()
            self.container = None


def _start_broker(conf: str, state_dir: Path, *overlays: str) -> Iterator[Broker]:
    broker = (
        Broker(conf, state_dir, overlays)
        if _has_mosquitto()
        else _container_broker(conf, state_dir, overlays)
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _has_mosquitto() -> bool:
    return shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()


def _container_broker(conf: str, state_dir: Path, overlays: tuple[str, ...]) -> Broker:
    docker_ok = shutil.which("docker") is not None and (
        subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0
    )
    if not (docker_ok and importlib.util.find_spec("testcontainers") is not None):
        pytest.fail(
            "mosquitto is not installed. Run: apt-get install -y mosquitto mosquitto-clients "
            "(or, with a Docker engine: pip install -e '.[docker]')"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    return ContainerBroker(conf, state_dir, overlays)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker for the session, from mosquitto/dev.conf."""
    yield from _start_broker("dev.conf", tmp_path_factory.mktemp("broker"))


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of this test alone, for tests that stop, restart or wipe it."""
    yield from _start_broker("dev.conf", tmp_path / "broker")


@pytest.fixture
def small_queue_broker(tmp_path: Path) -> Iterator[Broker]:
    """dev.conf + mosquitto/small-queue.conf: queues 100 messages per client, $SYS every second.

    Also for tests that wait for a $SYS reading: seconds, where dev.conf's default takes 10-20 s.
    """
    yield from _start_broker("dev.conf", tmp_path / "broker", "small-queue.conf")


BRIDGE_USER, BRIDGE_PASSWORD = "bridge", "s3cret:/@x"


@pytest.fixture(scope="session")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """dev.conf + mosquitto/auth.conf: only BRIDGE_USER with BRIDGE_PASSWORD may connect."""
    state = tmp_path_factory.mktemp("auth-broker")
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(state / "passwd"), BRIDGE_USER, BRIDGE_PASSWORD],
        check=True,
        capture_output=True,
    )
    yield from _start_broker("dev.conf", state, "auth.conf")


def make_test_ca(directory: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 (ca.crt, server.crt, server.key)."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=mqtt-backup test CA",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )


@pytest.fixture(scope="session")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """dev.conf + mosquitto/tls.conf: the listener speaks TLS with a throwaway CA (ca.crt)."""
    state = tmp_path_factory.mktemp("tls-broker")
    make_test_ca(state)
    yield from _start_broker("dev.conf", state, "tls.conf")


@pytest.fixture(scope="session")
def mtls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """dev.conf + tls.conf + mtls.conf: TLS that requires a client certificate of its CA."""
    state = tmp_path_factory.mktemp("mtls-broker")
    make_test_ca(state)
    yield from _start_broker("dev.conf", state, "tls.conf", "mtls.conf")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MQTT_BACKUP_* from the developer's shell, and no ./mqtt-backup.toml from the repo."""
    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    # Every data dir reserves a ballast of allocated space: 1 MiB, not 64, for each test's.
    monkeypatch.setattr(ballast, "MAX_BYTES", 1024 * 1024)


@pytest.fixture(autouse=True)
def quick_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing knobs turned down for bridges in this process; what they pace stays the same.

    Retries still back off (0.5 s, then 1 s, with jitter), but stop doubling at 1 s, not 30 s: a
    broker back or a disk freed after a few seconds is seen within about a second, not after the
    4-8 s a grown delay takes.
    """
    turn_down_timing(monkeypatch)


def turn_down_timing(patch: pytest.MonkeyPatch) -> None:
    """What `quick_timing` sets; also for module fixtures that run a bridge (they start first)."""
    patch.setattr(backoff, "MAX_S", 1.0)  # reconnects (ingest, restore), storage stalls


@pytest.fixture
def unique() -> str:
    """A short random id for this test's topics and devices."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """This test's data directory (not yet created: the bridge creates it)."""
    return tmp_path / "data"


TRANSPORT_ENV = config.ENV_PREFIX + "TRANSPORT"


@pytest.fixture(params=["asyncio", pytest.param("paho", marks=pytest.mark.slow)])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ingest transport under test, for bridges in this process and in subprocesses.

    Ingest tests use both (`pytestmark = pytest.mark.usefixtures("transport")`), so neither rots:
    `make test` runs each on both; `make test-fast` on MQTT 5's default (asyncio) only. Tests of
    paho itself (MQTT 3.1.1, its log) choose it (`parametrize("transport", ["paho"], ...)`) and
    stay in both.
    """
    value = str(request.param)
    monkeypatch.setenv(TRANSPORT_ENV, value)
    return value


def make_settings(on: Broker, data: Path, **changes: Any) -> config.Settings:
    """Small settings, so edge cases show with small data: 3 partitions, batches of 50.

    The ingest transport is the `transport` fixture's on MQTT 5 (3.1.1 has only paho).
    """
    v5 = changes.get("protocol", "5") == "5"
    base = config.Settings(
        broker=on.url,
        data=data,
        partitions=3,
        batch_max=50,
        batch_ms=10,
        keepalive=10,
        transport=config.Transport(os.environ[TRANSPORT_ENV])
        if v5 and TRANSPORT_ENV in os.environ
        else None,
    )
    return config.with_overrides(base, **changes)


class BridgeThread:
    """A bridge running in this process, on its own thread."""

    def __init__(self, settings: config.Settings, **options: Any) -> None:
        self.bridge = Bridge(settings, **options)
        self.bridge.connect()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bridge", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.bridge.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def stop(self) -> None:
        """Stop in order (store, ack, disconnect) and re-raise what the thread raised."""
        self.bridge.stop()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "bridge did not stop within 30 s"
        if self.error is not None:
            raise self.error


@pytest.fixture
def run_bridge() -> Iterator[Callable[..., BridgeThread]]:
    """Start bridges in threads (options go to `Bridge`); each still running is stopped after."""
    running: list[BridgeThread] = []

    def start(settings: config.Settings, **options: Any) -> BridgeThread:
        bridge = BridgeThread(settings, **options)
        running.append(bridge)
        return bridge

    yield start
    for bridge in running:
        if bridge._thread.is_alive():
            bridge.stop()


@dataclass(frozen=True)
class Sent:
    """A message a test published."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


def device_client(broker: Broker, **options: Any) -> aiomqtt.Client:
    """An aiomqtt client of a test device on `broker` (credentials and CA as that broker needs)."""
    if "auth.conf" in broker.overlays:
        options.setdefault("username", BRIDGE_USER)
        options.setdefault("password", BRIDGE_PASSWORD)
    if "tls.conf" in broker.overlays:
        options["tls_params"] = aiomqtt.TLSParameters(ca_certs=str(broker.state_dir / "ca.crt"))
    options.setdefault("protocol", aiomqtt.ProtocolVersion.V5)
    return aiomqtt.Client("127.0.0.1", broker.port, **options)


async def publish_async(broker: Broker, messages: Sequence[Sent]) -> list[Sent]:
    """Publish in order; returns those the broker acknowledged (QoS 1) or accepted (QoS 0)."""
    done: list[Sent] = []
    async with device_client(broker) as client:
        for msg in messages:
            await client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            done.append(msg)
    return done


def publish(broker: Broker, messages: Sequence[Sent]) -> list[Sent]:
    """Synchronous wrapper around publish_async."""
    return asyncio.run(publish_async(broker, messages))


def read_all(data: Path) -> dict[str, list[StoredMessage]]:
    """Every stored message by device, in key order (a fresh read-only open sees what is synced)."""
    with StoreReader(data) as reader:
        return {d.device: list(reader.messages(d.device)) for d in reader.devices()}


def stored_count(data: Path) -> int:
    """How many messages the index says are stored (0 before the store exists)."""
    try:
        with StoreReader(data) as reader:
            return sum(d.count for d in reader.devices())
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def wait_until(
    check: Callable[[], bool], timeout: float = 30.0, what: str | Callable[[], str] = "condition"
) -> None:
    """Poll `check` until it holds; fail the test with `what` when it does not in time.

    `what` may be a function: it is called at the timeout, to say what the state was then.
    """
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout}s waiting for {said}")
        time.sleep(0.05)


def bridge_process(
    broker: Broker, data: Path, *args: str, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """`python -m mqtt_backup run` as a real subprocess (for kill -9 and signal tests)."""
    cmd = [sys.executable, "-m", "mqtt_backup", "run", "--broker", broker.url, "--data", str(data)]
    out = log.open("ab") if log else subprocess.DEVNULL
    return subprocess.Popen(
        [*cmd, "--partitions", "3", "--batch-max", "50", "--batch-ms", "10", *args],
        stdout=out,
        stderr=out,
        cwd=REPO,
    )
