"""Hostile review of issues 11-13 (scale-out, production, web view) on a real Mosquitto.

Each test reproduces one thing a hostile or unlucky user did to the landed work, and now passes
(each was seen failing before its fix).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from mqtt_backup import metrics
from mqtt_backup.cli import app
from mqtt_backup.errors import EXIT_BROKER, EXIT_RUNTIME
from mqtt_backup.ingest import PipelineStore
from mqtt_backup.storage import Pending
from tests.conftest import (
    REPO,
    BridgeThread,
    Broker,
    Sent,
    device_client,
    make_settings,
    publish,
    stored_count,
    wait_until,
)
from tests.faulty import FaultyStore
from tests.test_metrics import healthz
from tests.test_scaleout_restore import announce, restore, two_instances
from tools import devbroker


def _spoof(broker: Broker, topic: str, body: dict[str, object]) -> None:
    """What a device can do on a broker without the production ACL: a retained status."""

    async def send() -> None:
        async with device_client(broker) as client:
            await client.publish(topic, json.dumps(body).encode(), qos=1, retain=True)

    asyncio.run(send())


def test_a_status_without_protocol_does_not_turn_a_group_restore_into_a_one_answer_one(
    broker: Broker, tmp_path: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    """A device publishes `{"state": "online"}` (no `protocol`) anywhere under backup/status.

    Before: the client took that for an old bridge, asked the one-answer way without the group,
    wrote the first instance's terminal as the summary ("restored 3 ... (complete)", exit 0) and
    a mix of both instances' messages: a silent wrong answer to `restore --group`.
    """
    ns, dirs = two_instances(broker, tmp_path, unique, run_bridge)
    publish(broker, [Sent(f"t{unique}/d1", f"m{i}".encode()) for i in range(20)])
    wait_until(lambda: sum(stored_count(d) for d in dirs) >= 20, 20, "20 stored")
    _spoof(broker, f"{ns}/status/other/old", {"state": "online"})

    result = restore(broker, ns, "d1", "--group", f"g{unique}")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [m["ts"] for m in lines] == sorted(m["ts"] for m in lines)  # merged by receive time
    assert sorted(m["payload"] for m in lines) == sorted(f"m{i}" for i in range(20))
    assert "restored 20 messages of d1 from 2 instances (a, b) (complete)" in result.stderr


def test_traffic_on_the_status_topic_does_not_keep_a_silent_members_restore_waiting(
    broker: Broker, tmp_path: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    """A ghost member never answers; some client keeps publishing to backup/status/... .

    Before: every status message pushed the deadline back, so `--timeout 1` never came while
    the noise went on (27 s by hand with a 3 s timeout and one message a second): a device
    without the ACL could hang every group restore.
    """
    ns, _dirs = two_instances(broker, tmp_path, unique, run_bridge)
    announce(broker, ns, f"g{unique}", "ghost")
    result = _restore_amid_noise(broker, f"{ns}/status/noise/n", ns, "d2")
    assert result.exit_code == EXIT_RUNTIME, result.output
    assert "ghost sent no terminal in time" in result.stderr


def _restore_amid_noise(broker: Broker, noise_topic: str, ns: str, device: str) -> Result:
    """`restore --timeout 1` while a client publishes to `noise_topic` ten times a second.

    The noise stops when the restore returns, or after 200 messages, when the test fails.
    """
    restore_done = threading.Event()
    noise: list[int] = []

    async def chatter() -> None:
        async with device_client(broker) as client:
            for i in range(200):
                if restore_done.is_set():
                    return
                await client.publish(noise_topic, b"x", qos=0)
                noise.append(i)
                await asyncio.sleep(0.1)

    chatterer = threading.Thread(target=asyncio.run, args=(chatter(),))
    chatterer.start()
    try:
        wait_until(lambda: len(noise) > 0, 10, "noise started")
        result = restore(broker, ns, device, "--timeout", "1")
    finally:
        restore_done.set()
        chatterer.join()
    assert len(noise) < 200, "the restore waited as long as the noise went on"
    return result


def test_others_traffic_on_the_default_response_topic_does_not_keep_a_restore_waiting(
    broker: Broker, unique: str
) -> None:
    """No bridge online; something keeps publishing on backup/restore/<device>/response.

    Before: every message there pushed `--timeout` back, though none answered our request.
    """
    ns = f"ns{unique}"
    result = _restore_amid_noise(broker, f"{ns}/restore/d3/response", ns, "d3")
    assert result.exit_code == EXIT_BROKER, result.output
    assert "no bridge answered" in result.stderr


# ---- production: logs and secrets -----------------------------------------------------------


def test_the_visible_password_warning_is_a_json_line_under_log_format_json(
    tmp_path: Path,
) -> None:
    """`run --log-format json --broker mqtt://u:pw@...`: every log line must be one JSON object.

    Before: the warning came before logging was set up, as a bare text line (Python's last
    resort handler): a log shipper parsing JSON met a line that is not.
    """
    closed = devbroker.free_port()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "mqtt_backup", "run", "--log-format", "json", "--broker"),
            *(f"mqtt://u:pw-{closed}@127.0.0.1:{closed}", "--data", str(tmp_path / "d")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == EXIT_BROKER, result.stderr
    *logged, error = [json.loads(line) for line in result.stderr.strip().splitlines()]
    # The CLI's one line is a JSON log line too (it was bare text among JSON lines).
    assert error["level"] == "error", error
    assert error["message"].startswith("mqtt-backup: cannot reach the broker"), error
    warnings = [r for r in logged if r["level"] == "warning"]
    assert len(warnings) == 1, logged
    assert "--password-file" in warnings[0]["message"]
    assert f"pw-{closed}" not in result.stderr


@pytest.mark.parametrize("asked", ["flag", "environment"])
def test_a_start_refused_on_its_settings_says_so_in_json_when_json_was_asked(
    tmp_path: Path, asked: str
) -> None:
    # Before: the settings that did not load (here a template without {device}) decided no log
    # format, so the one error line came as bare text, though the flag or variable said json.
    flag = ["--log-format", "json"] if asked == "flag" else []
    env = {**os.environ, "MQTT_BACKUP_LOG_FORMAT": "json"} if asked == "environment" else None
    result = subprocess.run(
        [sys.executable, "-m", "mqtt_backup", "run", *flag, "--topic", "devices/#"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**(env or os.environ), "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    said = json.loads(line)
    assert said["level"] == "error", said
    assert said["message"].startswith("mqtt-backup: "), said
    assert "{device}" in said["message"], said


class _StalledDisk(FaultyStore):
    """A disk that stops answering: writes block (an NFS server gone, a dying disk's fsync)."""

    def __init__(self, inner: PipelineStore, release: threading.Event) -> None:
        super().__init__(inner)
        self.release = release
        self.blocked = threading.Event()

    def write(
        self, partition: str, items: Sequence[Pending], prepared: object | None = None
    ) -> None:
        """Block until released (at most 120 s), then store."""
        self.blocked.set()
        self.release.wait(120)
        super().write(partition, items, prepared)


def test_healthz_says_503_while_a_write_hangs(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: Callable[..., BridgeThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A write counts as hung after 10 s; 1 s here: the same 503, without the wait.
    monkeypatch.setattr(metrics, "WRITE_HUNG_S", 1.0)
    release = threading.Event()
    stores: list[_StalledDisk] = []

    def wrap(store: PipelineStore) -> _StalledDisk:
        stores.append(_StalledDisk(store, release))
        return stores[-1]

    port = devbroker.free_port()
    run_bridge(make_settings(broker, data_dir, metrics_port=port), wrap_store=wrap)
    try:
        wait_until(lambda: healthz(port)[0] == 200, 30, "/healthz 200 at the start")
        publish(broker, [Sent(f"devices/{unique}/t", b"x")])
        wait_until(lambda: any(s.blocked.is_set() for s in stores), 30, "the write to hang")
        wait_until(lambda: healthz(port)[0] == 503, 30, "/healthz to report the hung write")
        assert "a storage write has not returned" in healthz(port)[1]
    finally:
        release.set()


def test_a_refused_restore_client_is_not_called_the_bridge(auth_broker: Broker) -> None:
    url = f"mqtt://nobody@127.0.0.1:{auth_broker.port}"
    result = restore(auth_broker, "backup", "d1", "--timeout", "1", "--broker", url)
    assert result.exit_code == EXIT_BROKER, result.output
    assert "the bridge" not in result.stderr, result.stderr
    assert "restore client" in result.stderr, result.stderr
    status = CliRunner().invoke(app, ["status", "--broker", url, "--wait", "0.2"])
    assert status.exit_code == EXIT_BROKER, status.output
    assert "the broker refused the status client: " in status.stderr, status.stderr
