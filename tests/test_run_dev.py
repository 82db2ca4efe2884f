"""`make run` (tools/run-dev.sh) stopped with Ctrl-C: the terminal's SIGINT to the whole group.

The script runs from a copy of the checkout's layout in a temp dir (its `.run/` there, its port a
free one), so it never touches a developer's own `make run` state or port 1883.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Broker, wait_until
from tools.devbroker import free_port

pytestmark = pytest.mark.slow


def _layout(tmp_path: Path, port: int) -> Path:
    """A directory the script takes for the checkout: its copy, tools' modules, the venv."""
    home = tmp_path / "checkout"
    tools = home / "tools"
    tools.mkdir(parents=True)
    script = (REPO / "tools" / "run-dev.sh").read_text()
    assert "\nPORT=1883\n" in script
    (tools / "run-dev.sh").write_text(script.replace("\nPORT=1883\n", f"\nPORT={port}\n"))
    for name in ("__init__.py", "devbroker.py"):
        (tools / name).symlink_to(REPO / "tools" / name)
    (home / ".venv").symlink_to(REPO / ".venv")
    return home


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_BACKUP_")}
    env.update(extra)
    return env


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Scripts started by a test; any still running at its end is stopped, group and all."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(
    home: Path, log: Path, env: dict[str, str], *args: str, into: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # Its own process group, as a terminal's foreground job: Ctrl-C signals all of it.
        proc = subprocess.Popen(
            ["bash", str(home / "tools" / "run-dev.sh"), *args],
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )
    into.append(proc)

    def running() -> bool:
        assert proc.poll() is None, log.read_text()
        return "mqtt-backup running" in log.read_text()

    wait_until(running, 30, lambda: f"the bridge to start:\n{log.read_text()}")
    return proc


def test_ctrl_c_ends_make_run_with_the_bridges_status(
    broker: Broker, tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    # Found by a new user: the trap cut the script's `wait` short, so it exited 130 (make:
    # "Error 130") while the bridge stopped cleanly with 0.
    home = _layout(tmp_path, free_port())
    env = _environment(MQTT_BACKUP_BROKER=broker.url, MQTT_BACKUP_DATA=str(tmp_path / "data"))
    log = tmp_path / "run.log"
    proc = _start(home, log, env, "--partitions", "3", into=started)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert "stopped" in log.read_text()


def test_ctrl_c_keeps_the_brokers_last_lines(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    # Found by a new user: SIGINT killed the `sed` that prefixes Mosquitto's log, so what the
    # broker said while stopping was lost.
    port = free_port()
    home = _layout(tmp_path, port)
    env = _environment(MQTT_BACKUP_DATA=str(tmp_path / "data"))
    log = tmp_path / "run.log"
    url = f"mqtt://127.0.0.1:{port}"
    proc = _start(home, log, env, "--broker", url, "--partitions", "3", into=started)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 0, log.read_text()
    client_id = re.search(r"client id (\S+),", log.read_text())
    assert client_id, log.read_text()
    # The broker's last words at its log level: the bridge's disconnect. The prefixing sed may
    # write them after the script has ended.
    said = re.compile(
        rf"^\[mosquitto\] \d+: Client {re.escape(client_id[1])} disconnected", re.MULTILINE
    )
    wait_until(
        lambda: said.search(log.read_text()) is not None,
        10,
        lambda: f"the broker's stopping lines:\n{log.read_text()}",
    )
