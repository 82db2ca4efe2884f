"""Adding, removing and rebalancing partitions: only the right devices move, and crash-safely."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.config import Settings, Transport
from mqtt_backup.control import call
from mqtt_backup.errors import UsageError
from mqtt_backup.keys import device_key
from mqtt_backup.mqtt import PahoIngest
from mqtt_backup.placement import Weighted, place
from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store, StoreReader, checks, moves, units
from mqtt_backup.storage.manifest import load_manifest
from mqtt_backup.storage.partition import Partition
from tests.conftest import (
    REPO,
    BridgeThread,
    Broker,
    Sent,
    make_settings,
    publish,
    stored_count,
    wait_until,
)

RunBridge = Callable[[Settings], BridgeThread]
DEVICES = 1000
PER_DEVICE = 4
runner = CliRunner()


def fill(data: Path, devices: int = DEVICES, per_device: int = PER_DEVICE) -> None:
    """`devices` devices with `per_device` messages each, on 3 partitions."""
    store = Store.open(data, partitions=3)
    try:
        groups: dict[str, list[Pending]] = {}
        for d in range(devices):
            device = f"dev-{d:04d}"
            partition, dev_key = store.locate(device)
            groups.setdefault(partition, []).extend(
                Pending(device, dev_key, 10**18 + i, Record(f"devices/{device}/t", b"%d" % i))
                for i in range(per_device)
            )
        for partition, items in groups.items():
            store.write(partition, items)
    finally:
        store.close()


def layout(data: Path) -> dict[str, str]:
    """device -> partition, as readers see it."""
    with StoreReader(data) as reader:
        return {d.device: d.partition for d in reader.devices()}


def assert_every_message_once(data: Path, devices: int = DEVICES) -> None:
    with StoreReader(data) as reader:
        listed = reader.devices()
        assert len(listed) == devices
        for info in listed:
            payloads = [m.record.payload for m in reader.messages(info.device)]
            assert payloads == [b"%d" % i for i in range(PER_DEVICE)], info.device
            assert info.count == PER_DEVICE


def test_adding_a_4th_and_5th_partition_moves_about_1_in_n_plus_1(data_dir: Path) -> None:
    fill(data_dir)
    for new, n in (("p3", 3), ("p4", 4)):
        before = layout(data_dir)
        store = Store.open(data_dir, create=False)
        try:
            result = moves.add(store, new)
        finally:
            store.close()
        after = layout(data_dir)
        moved = [d for d in before if before[d] != after[d]]
        assert {after[d] for d in moved} == {new}, "devices move only onto the new partition"
        fraction = len(moved) / DEVICES
        assert abs(fraction - 1 / (n + 1)) <= 0.1 / (n + 1), fraction
        assert result.moves.devices == len(moved)
        assert_every_message_once(data_dir)
    assert [s.name for s in load_manifest(data_dir).partitions] == ["p0", "p1", "p2", "p3", "p4"]


def test_removing_a_partition_moves_only_its_devices(data_dir: Path) -> None:
    fill(data_dir)
    before = layout(data_dir)
    store = Store.open(data_dir, create=False)
    try:
        result = moves.remove(store, "p1")
        with pytest.raises(UsageError, match="no partition"):
            moves.remove(store, "p1x")
    finally:
        store.close()
    after = layout(data_dir)
    moved = {d for d in before if before[d] != after[d]}
    assert moved == {d for d, p in before.items() if p == "p1"}
    assert result.moves.devices == len(moved)
    assert "p1" not in set(after.values())
    assert not (data_dir / "partitions" / "p1").exists()
    assert_every_message_once(data_dir)


def test_removing_the_last_partition_is_refused(data_dir: Path) -> None:
    store = Store.open(data_dir, partitions=1)
    try:
        with pytest.raises(UsageError, match="last partition"):
            moves.remove(store, "p0")
    finally:
        store.close()


def test_a_move_interrupted_after_the_switch_is_finished_by_a_rerun(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(data_dir, devices=200)

    def crash(*_args: object) -> None:
        raise KeyboardInterrupt("injected crash after the manifest switch")

    store = Store.open(data_dir, create=False)
    monkeypatch.setattr(moves, "_drop", crash)
    with pytest.raises(KeyboardInterrupt):
        moves.add(store, "p3")
    store.close()
    monkeypatch.undo()
    assert_every_message_once(data_dir, devices=200)
    dry = runner.invoke(
        app, ["partitions", "rebalance", "--dry-run", "--json", "--data", str(data_dir)]
    )
    assert dry.exit_code == 0, dry.output
    leftovers = json.loads(dry.output)
    assert leftovers["devices"] > 0, "old copies are still there to clean"
    again = runner.invoke(app, ["partitions", "add", "p3", "--data", str(data_dir)])
    assert again.exit_code == 0, again.output
    clean = runner.invoke(
        app, ["partitions", "rebalance", "--dry-run", "--json", "--data", str(data_dir)]
    )
    assert json.loads(clean.output)["devices"] == 0
    assert_every_message_once(data_dir, devices=200)


@pytest.mark.slow  # 6 processes; an injected crash mid-move is test_a_move_interrupted_after_...
def test_kill_9_during_an_add_then_rerun_loses_and_duplicates_nothing(data_dir: Path) -> None:
    fill(data_dir)
    command = [
        sys.executable,
        "-m",
        "mqtt_backup",
        "partitions",
        "add",
        "p3",
        "--data",
        str(data_dir),
    ]
    new_dir = data_dir / "partitions" / "p3"
    killed = 0
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1):
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while not new_dir.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        proc.kill()
        killed += proc.wait() == -signal.SIGKILL
        assert_every_message_once(data_dir)  # whatever the step, every message reads once
    assert killed >= 2, "the kills must land while the add is working"
    finished = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert finished.returncode == 0, finished.stderr
    assert_every_message_once(data_dir)
    store = Store.open(data_dir, create=False)
    try:
        assert moves.rebalance(store, dry_run=True).devices == 0
    finally:
        store.close()


def test_partitions_change_while_the_bridge_runs(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    run_bridge(make_settings(broker, data_dir))
    publish(broker, [Sent(f"devices/{unique}-{i}/t", b"a") for i in range(60)])
    wait_until(lambda: stored_count(data_dir) >= 60, 20, "first messages")
    added = runner.invoke(app, ["partitions", "add", "p3", "--data", str(data_dir), "--json"])
    assert added.exit_code == 0, added.output
    assert json.loads(added.output)["devices"] > 0
    publish(broker, [Sent(f"devices/{unique}-{i}/t", b"b") for i in range(60)])
    wait_until(lambda: stored_count(data_dir) >= 120, 20, "messages after the add")
    removed = runner.invoke(app, ["partitions", "remove", "p0", "--data", str(data_dir)])
    assert removed.exit_code == 0, removed.output
    with StoreReader(data_dir) as reader:
        for i in range(60):
            got = [m.record.payload for m in reader.messages(f"{unique}-{i}")]
            assert got == [b"a", b"b"], i
    listed = runner.invoke(app, ["partitions", "list", "--data", str(data_dir), "--json"])
    assert [p["name"] for p in json.loads(listed.output)] == ["p1", "p2", "p3"]
    assert sum(p["messages"] for p in json.loads(listed.output)) == 120


def _devices_moving_to(new: str, unique: str, moving: int, staying: int) -> list[str]:
    """`moving` device ids that adding partition `new` to p0-p2 moves, then `staying` ones."""
    now = [Weighted(f"p{i}") for i in range(3)]
    after = [*now, Weighted(new)]
    found: dict[bool, list[str]] = {True: [], False: []}
    for i in itertools.count():
        device = f"{unique}-{i}"
        moves = place(device_key(device), after) == new
        if len(found[moves]) < (moving if moves else staying):
            found[moves].append(device)
        if len(found[True]) == moving and len(found[False]) == staying:
            return found[True] + found[False]
    raise AssertionError("unreachable")


@pytest.mark.slow  # 4 s or more by design: an operation longer than Mosquitto's 1.5 keepalives
def test_a_long_operation_keeps_the_bridge_connected_and_places_what_arrives(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # keepalive 2 s (below the CLI's minimum of 5): Mosquitto drops a client silent for more than
    # 3 s (1.5 keepalives, in whole seconds, so 1 s would leave no margin on a busy machine). An
    # add that spans three of the bridge's pings (4 s or more) shows it kept talking meanwhile.
    # Pings are counted from paho's log; the asyncio transport has its own keep-alive tests.
    settings = make_settings(broker, data_dir, keepalive=2, transport=Transport.PAHO)
    bridge = run_bridge(settings)
    devices = _devices_moving_to("p3", unique, moving=40, staying=20)
    publish(broker, [Sent(f"devices/{d}/t", b"before") for d in devices])
    wait_until(lambda: stored_count(data_dir) >= len(devices), 20, "first messages")
    pings: list[float] = []
    cast("PahoIngest", bridge.bridge._transport)._client.on_log = lambda _c, _u, _level, text: (
        pings.append(time.monotonic()) if text == "Sending PINGREQ" else None
    )
    disconnects: list[str] = []
    monkeypatch.setattr(bridge.bridge, "disconnected", disconnects.append)
    copying, published = threading.Event(), threading.Event()
    slow_copies: list[int] = []  # pings sent when each slow copy began
    real_copy = Partition.copy_keys_from

    def slow_copy(
        self: Partition,
        source: Partition,
        dev_key: bytes,
        after: bytes | None,
        limit: int,
        **options: bool,
    ) -> tuple[bytes | None, int]:
        # A big device on a slow disk: each copy takes a while, and the bridge breathes only
        # between copies. Slow until the devices have published and three pings went out.
        if not copying.is_set():
            copying.set()
            pings.clear()
        if len(pings) < 3 or not published.is_set():
            slow_copies.append(len(pings))
            time.sleep(0.3)  # the slow disk under test, not a wait for a condition
        return real_copy(self, source, dev_key, after, limit, **options)

    monkeypatch.setattr(Partition, "copy_keys_from", slow_copy)
    add = [sys.executable, "-m", "mqtt_backup", "partitions", "add", "p3", "--json"]
    result: list[subprocess.CompletedProcess[str]] = []
    adder = threading.Thread(
        target=lambda: result.append(
            subprocess.run(
                [*add, "--data", str(data_dir)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        )
    )
    adder.start()
    wait_until(copying.is_set, 60, "the add to start copying")
    publish(broker, [Sent(f"devices/{d}/t", b"during") for d in devices])
    published.set()
    adder.join(120)
    assert result[0].returncode == 0, result[0].stderr
    assert json.loads(result[0].stdout)["devices"] == 40
    # The copies stopped being slow before the last of the 40: the publish and the third ping
    # both happened during the add.
    assert len(slow_copies) < 40, slow_copies
    assert disconnects == [], "keepalives were answered while the add ran"
    wait_until(lambda: stored_count(data_dir) >= 2 * len(devices), 30, "what arrived meanwhile")
    with StoreReader(data_dir) as reader:
        for d in devices:
            assert [m.record.payload for m in reader.messages(d)] == [b"before", b"during"], d
        assert {d.device: d.partition for d in reader.devices() if d.device in devices} == {
            d: "p3" if i < 40 else place(device_key(d), [Weighted(f"p{j}") for j in range(3)])
            for i, d in enumerate(devices)
        }
    monkeypatch.undo()
    bridge.stop()
    assert checks.verify(data_dir).ok


class _Waves:
    """Messages published at chosen copy units of a move, and what the bridge did meanwhile.

    At the copy unit a wave is due, the copy waits until the test has published the wave and the
    bridge has read it (held: nothing is committed while a unit runs); every copy notes how many
    messages the bridge had acknowledged by then.
    """

    def __init__(
        self, bridge: BridgeThread, waves: dict[str, list[str]], due_at: dict[int, str]
    ) -> None:
        self.bridge = bridge
        self.waves = waves
        self.due_at = due_at
        self.due = {w: threading.Event() for w in waves}
        self.published = {w: threading.Event() for w in waves}
        self.events: list[tuple[str, int]] = []  # (what, acknowledged by then), in order
        self._calls = itertools.count(1)
        self._real = Partition.copy_keys_from

    def copy(
        self,
        part: Partition,
        source: Partition,
        dev_key: bytes,
        after: bytes | None,
        limit: int,
        **options: bool,
    ) -> tuple[bytes | None, int]:
        """`Partition.copy_keys_from`, observed."""
        snapshot = self.bridge.bridge.snapshot()
        self.events.append(("copy", snapshot.acknowledged))
        wave = self.due_at.get(next(self._calls))
        if wave is not None:
            self.due[wave].set()
            assert self.published[wave].wait(30)
            count = snapshot.received + len(self.waves[wave])
            wait_until(lambda: self._reads(count), 30, "reads")
            self.events.append((f"held {wave}", self.bridge.bridge.snapshot().acknowledged))
        return self._real(part, source, dev_key, after, limit, **options)

    def _reads(self, count: int) -> bool:
        """Whether the bridge has read `count` messages (its loop reads on during a unit)."""
        return self.bridge.bridge.snapshot().received >= count

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Observe every copy of a move from now on."""

        def copy_keys_from(
            part: Partition,
            source: Partition,
            dev_key: bytes,
            after: bytes | None,
            limit: int,
            **options: bool,
        ) -> tuple[bytes | None, int]:
            return self.copy(part, source, dev_key, after, limit, **options)

        monkeypatch.setattr(Partition, "copy_keys_from", copy_keys_from)

    def publish_when_due(self, broker: Broker, result: list[dict[str, Any]]) -> None:
        for wave, devices in self.waves.items():
            self._wait_due(wave, result)
            publish(broker, [Sent(f"devices/{d}/t", wave.encode()) for d in devices])
            self.published[wave].set()

    def _wait_due(self, wave: str, result: list[dict[str, Any]]) -> None:
        # The add's answer, when it comes first, says why the move never got there.
        due = self.due[wave]
        wait_until(lambda: due.is_set() or bool(result), 60, lambda: f"wave {wave}: {result}")
        assert due.is_set(), f"the add ended before wave {wave}: {result}"

    def acknowledged_during_the_move(self, wave: str, total: int) -> None:
        """The wave was held during one unit, then acknowledged at a later unit of the move."""
        held = next(i for i, e in enumerate(self.events) if e[0] == f"held {wave}")
        assert self.events[held][1] < total, self.events[held]
        later = [n for what, n in self.events[held + 1 : -1] if what == "copy"]
        assert max(later) >= total, (wave, self.events[held:][:5])


def _assert_placed(data_dir: Path, expected: dict[str, list[bytes]], after: list[Weighted]) -> None:
    """Every device where placement says, with exactly these messages; no copy left behind."""
    with StoreReader(data_dir) as reader:
        listed = {d.device: d for d in reader.devices()}
        assert sorted(listed) == sorted(expected)
        for device, payloads in expected.items():
            assert listed[device].partition == place(device_key(device), after), device
            assert [m.record.payload for m in reader.messages(device)] == payloads, device
    store = Store.open(data_dir, create=False)
    try:
        assert moves.rebalance(store, dry_run=True).devices == 0, "no copy left behind"
    finally:
        store.close()
    assert checks.verify(data_dir).ok


@pytest.mark.parametrize(
    ("client", "protocol"),
    [
        (Transport.ASYNCIO, "5"),
        pytest.param(Transport.PAHO, "5", marks=pytest.mark.slow),
        pytest.param(Transport.PAHO, "3.1.1", marks=pytest.mark.slow),
    ],
)
def test_a_move_in_units_acknowledges_new_messages_before_it_ends(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    monkeypatch: pytest.MonkeyPatch,
    client: Transport,
    protocol: str,
) -> None:
    """An add on a store that takes many units (small ones: the knob, not a huge store).

    Messages published while it copies are stored and acknowledged between its units, before it
    ends; afterwards every message is where placement says, once. Ordering only, no timing. On
    each transport (both run the units in a worker thread and commit between them on the loop).
    """
    monkeypatch.setattr(units, "UNIT_KEYS", 20)
    fill(data_dir)  # 1,000 devices x 4 messages on p0-p2: about 1,000 records move to p3
    bridge = run_bridge(make_settings(broker, data_dir, protocol=protocol, transport=client))
    wait_until(lambda: bridge.bridge._transport.connected, 20, "the bridge to connect")
    # Connected comes first; the control socket is bound when the loop starts, a moment later.
    wait_until((data_dir / "control.sock").exists, 20, "the control socket")
    waves = _Waves(
        bridge,
        {
            wave: [
                *[f"dev-{d:04d}" for d in range(offset, DEVICES, 25)],  # moving or not
                *[f"{unique}-{wave}-{i}" for i in range(10)],  # devices born during the add
            ]
            for wave, offset in (("a", 0), ("b", 7))
        },
        due_at={1: "a", 25: "b"},  # the copy units at which each wave is published
    )
    waves.install(monkeypatch)
    acked_before = bridge.bridge.snapshot().acknowledged
    result: list[dict[str, Any]] = []

    def add() -> None:
        try:
            result.append(call(data_dir, "partitions-add", {"name": "p3"}, timeout=120))
        except Exception as exc:  # the wait for the waves reports it
            result.append({"error": f"{exc!r}"})
            raise

    adder = threading.Thread(target=add)
    adder.start()
    waves.publish_when_due(broker, result)
    adder.join(120)
    assert result, "the add answered"
    waves.events.append(("add done", bridge.bridge.snapshot().acknowledged))
    assert result[0]["added"] == "p3"
    assert result[0]["devices"] > 200
    first = len(waves.waves["a"])
    waves.acknowledged_during_the_move("a", acked_before + first)
    waves.acknowledged_during_the_move("b", acked_before + first + len(waves.waves["b"]))
    monkeypatch.undo()
    bridge.stop()
    expected = {f"dev-{d:04d}": [b"%d" % i for i in range(PER_DEVICE)] for d in range(DEVICES)}
    for wave, devices in waves.waves.items():
        for device in devices:
            expected.setdefault(device, []).append(wave.encode())
    _assert_placed(data_dir, expected, [*[Weighted(f"p{i}") for i in range(3)], Weighted("p3")])
