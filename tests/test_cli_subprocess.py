"""Each command once as a real process (`python -m mqtt_backup ...`), as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
from tests.test_partitions import fill


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqtt_backup", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


def ok(*args: str) -> str:
    result = cli(*args)
    assert result.returncode == 0, (args, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def ok_side_by_side(*commands: tuple[str, ...]) -> list[str]:
    """Run read-only commands as processes at once (each opens the store read-only); stdouts."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mqtt_backup", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for args in commands
    ]
    outputs = []
    for args, proc in zip(commands, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, (args, stderr)
        assert "Traceback" not in stderr
        outputs.append(stdout)
    return outputs


@pytest.mark.slow  # 14 processes; test_operations and test_cli_errors run the commands in-process
def test_offline_commands_as_processes(data_dir: Path, tmp_path: Path) -> None:
    fill(data_dir, devices=40)
    d = ("--data", str(data_dir))
    devices, export, stats, verify = ok_side_by_side(
        ("devices", *d, "--json"),
        ("export", *d, "--device", "dev-0001"),
        ("stats", *d, "--json"),
        ("verify", *d, "--json"),
    )
    assert len(json.loads(devices)) == 40
    assert export.count("\n") == 4
    assert json.loads(stats)["total"]["messages"] == 160
    assert json.loads(verify)["ok"] is True
    assert "snapshot of 3 partitions" in ok("snapshot", str(tmp_path / "snap"), *d)
    assert json.loads(ok("forget", "dev-0002", *d, "--json"))["messages"] == 4
    assert json.loads(ok("prune", *d, "--max-bytes-per-device", "100", "--json"))["messages"] > 0
    planned = json.loads(ok("partitions", "add", "p3", "--dry-run", "--json", *d))
    assert planned["dry_run"] is True
    assert planned["devices"] > 0
    assert json.loads(ok("partitions", "add", "p3", "--json", *d))["devices"] == planned["devices"]
    assert "removing p0: moved" in ok("partitions", "remove", "p0", *d)
    assert json.loads(ok("partitions", "rebalance", "--dry-run", "--json", *d))["devices"] == 0
    names = [p["name"] for p in json.loads(ok("partitions", "list", "--json", *d))]
    assert names == ["p1", "p2", "p3"]
    assert json.loads(ok("verify", *d, "--json"))["ok"] is True


@pytest.mark.slow  # two processes; test_simulate feeds a bridge in this process
def test_simulate_feeds_a_running_bridge(broker: Broker, data_dir: Path, unique: str) -> None:
    bridge = BridgeThread(make_settings(broker, data_dir))
    try:
        done = cli(
            "simulate",
            "--broker",
            broker.url,
            "--devices",
            "2",
            "--rate",
            "50",
            "--duration",
            "1",
            "--prefix",
            unique,
        )
        assert done.returncode == 0, done.stderr
        assert "published 50 messages" in done.stderr
        # Two devices use the telemetry and raw shapes: both lie under devices/{device}/#.
        wait_until(lambda: stored_count(data_dir) >= 51, 20, "the fleet's messages")
    finally:
        bridge.stop()
        publish(broker, [Sent(f"devices/{unique}-0000/status", b"", retain=True)])
