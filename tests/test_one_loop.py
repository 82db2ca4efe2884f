"""The running bridge: ingest, restore and the control socket as tasks of one loop.

On either ingest transport (the `transport` fixture): the asyncio one, and paho through its
external-loop API.

Real Mosquitto, real bridges and RocksDB; a slow operation is injected by wrapping the dispatcher.
"""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from mqtt_backup import control, operations
from mqtt_backup.control import RemoteError, call
from mqtt_backup.errors import DataDirLocked
from mqtt_backup.storage import Store
from mqtt_backup.storage.units import Units
from tests.conftest import (
    BridgeThread,
    Broker,
    Sent,
    make_settings,
    publish,
    stored_count,
    wait_until,
)
from tests.test_restore_e2e import ask

RunBridge = Callable[..., BridgeThread]


def _start(run_bridge: RunBridge, broker: Broker, data: Path, **changes: Any) -> BridgeThread:
    bridge = run_bridge(make_settings(broker, data, **changes))  # the `transport` fixture's
    wait_until(bridge.bridge.restore_listening.is_set, 20, "the restore service to subscribe")
    return bridge


def _raw(data: Path, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(data / "control.sock"))
        sock.sendall(line)
        reply: dict[str, Any] = json.loads(sock.makefile("rb").readline())
    return reply


@pytest.mark.usefixtures("transport")
def test_one_loop_runs_ingest_restore_and_control(
    broker: Broker, data_dir: Path, unique: str, run_bridge: RunBridge
) -> None:
    bridge = _start(run_bridge, broker, data_dir)
    names = {t.name for t in threading.enumerate()}
    assert "restore" not in names
    assert "control" not in names
    publish(broker, [Sent(f"devices/{unique}/t", b"m%d" % i) for i in range(5)])
    wait_until(lambda: stored_count(data_dir) >= 5, 20, "stored messages")
    assert ask(broker, unique)[-1]["count"] == 5
    assert call(data_dir, "rebalance", {"dry_run": True})["devices"] == 0
    bridge.stop()
    assert not (data_dir / "control.sock").exists()


def test_the_control_socket_is_private_and_keeps_its_error_shapes(
    broker: Broker, data_dir: Path, run_bridge: RunBridge
) -> None:
    _start(run_bridge, broker, data_dir)
    assert stat.S_IMODE((data_dir / "control.sock").stat().st_mode) == 0o600
    bad = _raw(data_dir, b"not json\n")
    assert bad["ok"] is False
    assert bad["exit_code"] == 2
    assert bad["error"].startswith("bad control request: ")
    assert _raw(data_dir, b'{"args": {}}\n')["exit_code"] == 2  # no op
    with pytest.raises(RemoteError, match="unknown operation") as refused:
        call(data_dir, "format-disk", {})
    assert refused.value.exit_code == 2
    with pytest.raises(RemoteError, match="no partition") as missing:
        call(data_dir, "partitions-remove", {"name": "nope"})
    assert missing.value.exit_code == 2


def test_a_data_dir_past_the_socket_path_limit_is_reached_through_its_fd(
    broker: Broker, tmp_path: Path, run_bridge: RunBridge
) -> None:
    data = tmp_path / ("d" * 60) / ("e" * 60) / "data"
    assert len(str(data / "control.sock")) > 107
    _start(run_bridge, broker, data)
    assert stat.S_IMODE((data / "control.sock").stat().st_mode) == 0o600
    assert call(data, "rebalance", {"dry_run": True})["dry_run"] is True


@pytest.mark.usefixtures("transport")
def test_during_an_operation_the_loop_reads_on_holds_and_answers_restores(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bridge = _start(run_bridge, broker, data_dir)
    publish(broker, [Sent(f"devices/{unique}-old/t", b"old%d" % i) for i in range(3)])
    wait_until(lambda: stored_count(data_dir) >= 3, 20, "the first messages stored")
    running, finish = threading.Event(), threading.Event()
    real = operations.units

    def slow(store: Store, op: str, args: Mapping[str, Any]) -> Units[dict[str, Any]]:
        running.set()
        assert finish.wait(60), "the test did not let the operation end"  # a long operation
        return (yield from real(store, op, args))

    monkeypatch.setattr(operations, "units", slow)
    result: list[dict[str, Any]] = []
    operating = threading.Thread(target=lambda: result.append(call(data_dir, "rebalance", {})))
    operating.start()
    try:
        assert running.wait(20)
        acked = bridge.bridge.snapshot().acknowledged
        publish(broker, [Sent(f"devices/{unique}-new/t", b"new%d" % i) for i in range(10)])
        wait_until(lambda: bridge.bridge.snapshot().received >= 13, 20, "the loop to read on")
        # Held, not committed: nothing interleaves with the operation's writes.
        assert bridge.bridge.snapshot().acknowledged == acked
        assert stored_count(data_dir) == 3
        answers = ask(broker, f"{unique}-old")  # the loop answers restores meanwhile
        assert answers[-1]["count"] == 3
    finally:
        finish.set()
        operating.join(30)
    assert result
    assert result[0]["dry_run"] is False
    wait_until(lambda: stored_count(data_dir) >= 13, 20, "the held messages stored")
    wait_until(lambda: bridge.bridge.snapshot().acknowledged >= acked + 10, 20, "their acks")


@pytest.mark.usefixtures("transport")
def test_stopping_during_an_operation_waits_for_its_running_unit(
    broker: Broker,
    data_dir: Path,
    run_bridge: RunBridge,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The store must not close under a unit in its worker thread; the operation then stops at
    # that unit's end (tests/test_operation_commits.py), not at its own.
    bridge = _start(run_bridge, broker, data_dir)
    running, finish = threading.Event(), threading.Event()
    store_open: list[bool] = []
    real = operations.units

    def slow(store: Store, op: str, args: Mapping[str, Any]) -> Units[dict[str, Any]]:
        running.set()
        finish.wait(60)
        store_open.append(not store.closed)
        return (yield from real(store, op, args))

    monkeypatch.setattr(operations, "units", slow)
    operating = threading.Thread(target=lambda: _quiet_call(data_dir), daemon=True)
    operating.start()
    assert running.wait(20)
    stopping = threading.Thread(target=bridge.stop)
    stopping.start()
    stopping.join(0.5)
    assert stopping.is_alive(), "the bridge stopped under a running unit"
    finish.set()
    stopping.join(30)
    assert store_open == [True]  # the store closed only after the unit ended


def _quiet_call(data: Path) -> None:
    try:
        call(data, "rebalance", {})
    except Exception:  # noqa: BLE001 - the bridge stops meanwhile: either outcome is fine here
        return


def test_a_command_waits_a_moment_for_a_starting_bridges_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bridge takes the lock first and binds its socket once connected: a command in between
    waits for the socket (here bound 0.3 s late) instead of saying it does not answer."""
    path = tmp_path / "control.sock"
    served: list[bytes] = []

    def bind_late() -> None:
        time.sleep(0.3)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            server.listen(1)
            conn, _ = server.accept()
            with conn:
                served.append(conn.makefile("rb").readline())
                conn.sendall(b'{"ok": true, "result": {"devices": 0}}\n')

    late = threading.Thread(target=bind_late)
    late.start()
    assert call(tmp_path, "rebalance", {"dry_run": True}, timeout=10) == {"devices": 0}
    late.join(10)
    assert json.loads(served[0])["op"] == "rebalance"

    monkeypatch.setattr(control, "STARTING_S", 0.2)  # a socket that never comes: refused
    path.unlink()
    with pytest.raises(DataDirLocked, match="control socket does not answer"):
        call(tmp_path, "rebalance", {"dry_run": True}, timeout=10)
