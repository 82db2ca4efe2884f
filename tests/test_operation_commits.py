"""The commit before an operation, and a failed start: what the bridge does around its operations.

Real Mosquitto, real bridges and RocksDB; a write held at a gate or failing is injected by
wrapping the store the pipeline writes to (`tests/faulty.py`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from mqtt_backup import bridge as bridge_module
from mqtt_backup import operations
from mqtt_backup.bridge import Bridge
from mqtt_backup.config import Transport
from mqtt_backup.control import RemoteError, call
from mqtt_backup.errors import StorageError
from mqtt_backup.ingest import PipelineStore
from mqtt_backup.storage import Pending, Store, checks
from mqtt_backup.storage import units as units_module
from mqtt_backup.storage.journal import STATE, BridgeState
from mqtt_backup.storage.units import Units, step
from tests.conftest import (
    BridgeThread,
    Broker,
    Sent,
    make_settings,
    publish,
    read_all,
    stored_count,
    wait_until,
)
from tests.faulty import Faults, FaultyStore
from tests.test_operations import fill
from tests.test_restore_e2e import ask

RunBridge = Callable[..., BridgeThread]


class Gate:
    """Holds each write at a gate while `closed`, until the test lets one through."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.closed = True
        self.entered = 0  # writes that reached the gate
        self._through = threading.Semaphore(0)

    def wrap(self, store: PipelineStore) -> PipelineStore:
        """The `Bridge(wrap_store=...)` seam."""
        return _GatedStore(store, self)

    def let_one_through(self) -> None:
        """The write waiting at the gate goes on."""
        self._through.release()

    def open(self) -> None:
        """No write waits from now on (those waiting go on)."""
        self.closed = False
        for _ in range(self.entered):
            self._through.release()

    def wait(self) -> None:
        """At the gate (on the writing thread)."""
        self.entered += 1
        assert self._through.acquire(timeout=60), "the test did not open the gate"


class _GatedStore(FaultyStore):
    def __init__(self, inner: PipelineStore, gate: Gate) -> None:
        super().__init__(inner, gate.faults)
        self._gate = gate

    def write(
        self, partition: str, items: Sequence[Pending], prepared: object | None = None
    ) -> None:
        """Wait at the gate while it is closed, then write (or fail) as `Faults` says."""
        if self._gate.closed:
            self._gate.wait()
        super().write(partition, items, prepared)


def _start(run_bridge: RunBridge, broker: Broker, data: Path, gate: Gate) -> BridgeThread:
    settings = make_settings(broker, data)  # the `transport` fixture's, or asyncio
    bridge = run_bridge(settings, wrap_store=gate.wrap)
    wait_until(bridge.bridge.restore_listening.is_set, 20, "the restore service to subscribe")
    return bridge


def _operate(data: Path, op: str, args: dict[str, Any], into: list[Any]) -> threading.Thread:
    def run() -> None:
        try:
            into.append(call(data, op, args, timeout=60))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            into.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _rebalance_behind_a_commit(
    bridge: BridgeThread, broker: Broker, data: Path, gate: Gate, unique: str
) -> tuple[int, threading.Thread, list[Any]]:
    """A commit waiting at the (closed) gate, 4 messages pending behind it, then a rebalance.

    Returns the received count before the first message, the rebalance's thread and its answer.
    """
    received = bridge.bridge.snapshot().received
    publish(broker, [Sent(f"devices/{unique}/t", b"m0")])
    wait_until(lambda: gate.entered == 1, 20, "a commit to wait at the gate")
    publish(broker, [Sent(f"devices/{unique}/t", b"m%d" % i) for i in range(1, 5)])
    wait_until(lambda: bridge.bridge.snapshot().received >= received + 5, 20, "pending messages")
    result: list[Any] = []
    return received, _operate(data, "rebalance", {}, result), result


@pytest.mark.usefixtures("transport")
def test_the_commits_before_an_operation_leave_the_loop_reading_and_answering(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    """The commit in flight, then the one of what is pending, run in the worker thread.

    Each is held at a gate in turn while the operation waits for it: the loop meanwhile reads
    on and answers a restore (the operation's wait used to block the loop: a synced write or a
    reopen on it stalled restores and pings).
    """
    faults = Faults()
    gate = Gate(faults)
    gate.closed = False
    bridge = _start(run_bridge, broker, data_dir, gate)
    publish(broker, [Sent(f"devices/{unique}-old/t", b"old")])
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "the first message stored")
    gate.closed = True
    received, operating, result = _rebalance_behind_a_commit(bridge, broker, data_dir, gate, unique)
    try:
        wait_until(lambda: bridge.bridge._operating, 20, "the operation to wait for the commit")
        publish(broker, [Sent(f"devices/{unique}/t", b"m5")])
        wait_until(
            lambda: bridge.bridge.snapshot().received >= received + 6, 10, "the loop to read on"
        )
        assert ask(broker, f"{unique}-old", timeout=10)[-1]["count"] == 1
        gate.let_one_through()  # the commit in flight ends; the pending one comes to the gate
        wait_until(lambda: gate.entered == 2, 20, "the commit of what was pending")
        assert not result, "the operation ran before what was pending was stored"
        publish(broker, [Sent(f"devices/{unique}/t", b"m6")])
        wait_until(
            lambda: bridge.bridge.snapshot().received >= received + 7, 10, "the loop to read on"
        )
        assert ask(broker, f"{unique}-old", timeout=10)[-1]["count"] == 1
    finally:
        gate.open()
        operating.join(60)
    assert len(result) == 1
    assert isinstance(result[0], dict), result
    wait_until(lambda: stored_count(data_dir) >= 8, 20, "every message stored")
    assert faults.calls["write_failed"] == 0


@pytest.mark.usefixtures("transport")
def test_a_failed_commit_before_an_operation_starts_the_stall_and_the_operation_runs(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    """The commit of what is pending fails: the stall starts (retries with backoff) and the
    operation runs as on a stalled bridge (docs/design-notes.md, "A full disk").

    It used to fail the operation (exit 4) without starting the stall, and the end of the hold
    retried the commit at once.
    """
    faults = Faults()
    gate = Gate(faults)
    bridge = _start(run_bridge, broker, data_dir, gate)
    transport = bridge.bridge._transport
    _, operating, result = _rebalance_behind_a_commit(bridge, broker, data_dir, gate, unique)
    try:
        wait_until(lambda: bridge.bridge._operating, 20, "the operation to wait for the commit")
        gate.let_one_through()  # the commit in flight is stored
        wait_until(lambda: gate.entered == 2, 20, "the commit of what was pending")
        assert faults.calls["write"] == 1
        faults.failing = True  # the disk fills: the commit of what was pending fails
    finally:
        gate.open()
        operating.join(60)
    assert len(result) == 1
    assert isinstance(result[0], dict), result  # it ran, as on a stalled bridge
    assert transport.stall.active, "the failure started the stall"
    assert stored_count(data_dir) == 1
    faults.failing = False
    wait_until(lambda: stored_count(data_dir) == 5, 30, "the stall's retry to store the rest")
    wait_until(lambda: not transport.stall.active, 20, "the stall to end")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_failed_commit_between_units_on_paho_fails_the_operation_and_loses_nothing(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
) -> None:
    """paho commits between units too: one that fails there fails the operation (exit 4).

    The stall starts; what was held is stored once storage works again, and the add, run again,
    finishes the move.
    """
    monkeypatch.setattr(units_module, "UNIT_KEYS", 20)
    fill(data_dir, devices=200, per_device=2)
    faults = Faults()
    settings = make_settings(broker, data_dir, protocol=protocol, transport=Transport.PAHO)
    bridge = run_bridge(settings, wrap_store=faults.wrap)
    wait_until((data_dir / "control.sock").exists, 20, "the control socket")
    real = operations.units
    sent = [Sent(f"devices/{unique}/t", b"m%d" % i) for i in range(5)]

    def failing_after_the_first_unit(
        store: Store, op: str, args: Mapping[str, Any]
    ) -> Units[dict[str, Any]]:
        work = real(store, op, args)
        assert step(work) is None, "the add takes more than one unit"
        received = bridge.bridge.snapshot().received
        publish(broker, sent)

        def read() -> bool:  # the loop reads on during the unit
            return bridge.bridge.snapshot().received >= received + len(sent)

        wait_until(read, 20, "the messages held during the unit")
        faults.failing = True  # the disk fills: the commit after this unit fails
        yield
        return (yield from work)

    monkeypatch.setattr(operations, "units", failing_after_the_first_unit)
    with pytest.raises(RemoteError) as failed:
        call(data_dir, "partitions-add", {"name": "p3"}, timeout=60)
    assert failed.value.exit_code == 4, failed.value
    assert "between two units" in str(failed.value)
    transport = bridge.bridge._transport
    assert transport.stall.active, "the failure started the stall"
    assert faults.calls["write_failed"] >= 1
    monkeypatch.setattr(operations, "units", real)
    faults.failing = False
    wait_until(lambda: stored_count(data_dir) == 400 + len(sent), 30, "the held messages stored")
    wait_until(lambda: not transport.stall.active, 20, "the stall to end")
    assert call(data_dir, "partitions-add", {"name": "p3"}, timeout=60)["added"] == "p3"
    bridge.stop()
    stored = [m.record.payload for m in read_all(data_dir)[unique] if not m.record.dup]
    assert sorted(stored) == sorted(s.payload for s in sent)
    assert checks.verify(data_dir).ok


@pytest.mark.usefixtures("transport")
def test_retention_during_a_storage_stall_prunes(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While commits fail, the hourly pass still prunes (paho's used to fail at its commit)."""
    fill(data_dir, devices=3, per_device=10)  # all of it from 2023
    monkeypatch.setattr(bridge_module, "RETENTION_EVERY_S", 1e9)  # no pass until the test says
    faults = Faults(failing=True)
    settings = make_settings(broker, data_dir, partitions=None, prune_older_than="30d")
    bridge = run_bridge(settings, wrap_store=faults.wrap)
    transport = bridge.bridge._transport
    publish(broker, [Sent(f"devices/{unique}/t", b"m%d" % i) for i in range(3)])
    wait_until(lambda: transport.stall.active, 20, "storage to stall")
    wait_until(lambda: bridge.bridge.pipeline.pending == 3, 20, "the messages held")
    with caplog.at_level(logging.INFO, logger="mqtt_backup.bridge"):
        bridge.bridge._clock.retention_at = -1e9  # due now

        def said() -> list[str]:
            # Not "retention" anywhere: this test's data directory's name holds the word.
            lines = [r.getMessage() for r in caplog.records]
            return [line for line in lines if line.startswith("retention")]

        wait_until(lambda: len(said()) > 0, 20, "the retention pass")
    assert said()[0].startswith("retention: pruned 30 messages"), said()
    assert stored_count(data_dir) == 0
    faults.failing = False
    wait_until(lambda: stored_count(data_dir) == 3, 30, "the held messages stored")


@pytest.fixture
def failing_state_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The state file cannot be read (an injected fault: the start fails after the store opened)."""

    def fail(_data_dir: Path) -> BridgeState:
        raise StorageError("state.json: input/output error (injected)")

    monkeypatch.setattr(BridgeState, "load", fail)


@pytest.mark.usefixtures("failing_state_load")
def test_a_failed_start_leaves_no_store_lock_or_check_thread(
    broker: Broker, data_dir: Path
) -> None:
    Store.open(data_dir, 3).close()  # an existing data directory: the failed start keeps it
    threads = set(threading.enumerate())
    with pytest.raises(StorageError, match="injected"):
        Bridge(make_settings(broker, data_dir))
    Store.open(data_dir, create=False).close()  # the lock was let go, in this process too
    left = [t.name for t in set(threading.enumerate()) - threads if t.is_alive()]
    assert left == []


def test_a_state_file_with_an_out_of_range_time_is_a_fresh_state(data_dir: Path) -> None:
    """`1e400` parses as infinity, which no int holds: unreadable, like any other bad file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / STATE).write_text('{"last_alive_ns": 1e400, "subscriptions": []}')
    assert BridgeState.load(data_dir) == BridgeState()
    (data_dir / STATE).write_text("[" * 100_000 + "]" * 100_000)
    assert BridgeState.load(data_dir) == BridgeState()


def test_a_stop_during_a_long_operation_ends_it_at_a_unit_boundary(
    broker: Broker,
    data_dir: Path,
    run_bridge: RunBridge,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A SIGTERM during a big `partitions add` waited for the whole move (and a service
    manager's stop timeout then killed the bridge anyway): now the operation ends at the next
    unit boundary, says so, and a re-run finishes it."""
    fill(data_dir, devices=20, per_device=5)
    monkeypatch.setattr(units_module, "UNIT_KEYS", 5)  # many units
    bridge = run_bridge(make_settings(broker, data_dir))
    steps = 0

    def step_then_stop(work: Units[Any]) -> Any:
        nonlocal steps
        steps += 1
        if steps == 2:
            bridge.bridge.stop()  # what the SIGTERM handler does, during the second unit
        return step(work)

    monkeypatch.setattr(bridge_module, "step", step_then_stop)
    with caplog.at_level(logging.INFO), pytest.raises(RemoteError) as stopped:
        call(data_dir, "partitions-add", {"name": "p3"}, timeout=60)
    assert stopped.value.message() == (
        "the bridge is stopping: the partitions-add stopped between two steps (nothing is "
        "half-done). Try: run the command again (on the bridge or offline) to finish it"
    )
    bridge.stop()
    assert steps == 2
    said = [r.getMessage() for r in caplog.records if r.name == "mqtt_backup.bridge"]
    assert "partitions-add asked over the control socket: running it beside ingest" in said
    assert any(  # the bridge's log says it too, not only the command that asked
        line.startswith("partitions-add ended after ")
        and line.endswith(" s: " + stopped.value.message())
        for line in said
    ), said
    report = checks.verify(data_dir)  # a store as a kill -9 at that boundary would leave it
    assert report.ok, [p.describe() for p in report.problems]
    store = Store.open(data_dir, create=False)
    try:
        assert len(store.manifest.partitions) == 3  # stopped before its switch
        operations.run(store, "partitions-add", {"name": "p3"})
        assert [s.name for s in store.manifest.partitions][-1] == "p3"
    finally:
        store.close()
    assert sum(len(m) for m in read_all(data_dir).values()) == 20 * 5
