"""Logging in and TLS: the bridge against password-protected and TLS listeners of Mosquitto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

from mqtt_backup import config
from mqtt_backup.cli import app
from mqtt_backup.errors import BrokerRefused, BrokerUnreachable, ConfigError
from tests.conftest import (
    BRIDGE_PASSWORD,
    BRIDGE_USER,
    REPO,
    BridgeThread,
    Broker,
    Sent,
    make_settings,
    publish,
    read_all,
    stored_count,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("transport")  # log-in and TLS on both ingest transports


def _url(broker: Broker, user: str, password: str) -> str:
    return f"mqtt://{quote(user)}:{quote(password, safe='')}@127.0.0.1:{broker.port}"


def test_bridge_logs_in_with_a_password_from_the_url(
    auth_broker: Broker, data_dir: Path, unique: str
) -> None:
    settings = make_settings(
        auth_broker, data_dir, broker=_url(auth_broker, BRIDGE_USER, BRIDGE_PASSWORD)
    )
    bridge = BridgeThread(settings)
    publish(auth_broker, [Sent(f"devices/{unique}/t", b"42")])
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "the message")
    bridge.stop()
    assert [m.record.payload for m in read_all(data_dir)[unique]] == [b"42"]


def test_wrong_password_is_refused(auth_broker: Broker, data_dir: Path) -> None:
    settings = make_settings(auth_broker, data_dir, broker=_url(auth_broker, BRIDGE_USER, "nope"))
    with pytest.raises(BrokerRefused, match="refused") as caught:
        BridgeThread(settings)
    assert caught.value.exit_code == 3


def test_wrong_password_on_the_command_line_is_one_line_and_exit_3(
    auth_broker: Broker, tmp_path: Path
) -> None:
    url = _url(auth_broker, BRIDGE_USER, "nope")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mqtt_backup",
            "run",
            "--broker",
            url,
            "--data",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    # The password in --broker is visible in `ps`: one warning says so, then the one error line.
    warning, *lines = result.stderr.strip().splitlines()
    assert "--password-file" in warning, warning
    assert len(lines) == 1, lines
    assert lines[0].startswith("mqtt-backup: the broker refused"), lines
    assert "nope" not in result.stderr, "the password must not be printed"


def test_bridge_connects_over_tls_with_the_ca(
    tls_broker: Broker, data_dir: Path, unique: str
) -> None:
    settings = make_settings(tls_broker, data_dir, ca=tls_broker.state_dir / "ca.crt")
    assert settings.broker.startswith("mqtts://")
    bridge = BridgeThread(settings)
    publish(tls_broker, [Sent(f"devices/{unique}/t", b"\x00secret\xff")])
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "the message over TLS")
    bridge.stop()
    assert [m.record.payload for m in read_all(data_dir)[unique]] == [b"\x00secret\xff"]


def test_a_queued_burst_over_tls_past_a_batch_is_stored_whole_and_in_order(
    tls_broker: Broker, data_dir: Path, unique: str
) -> None:
    """A session's queue over TLS, many batches long: the reads stop at each full batch and
    come back once it is stored (paho also for bytes TLS decrypted already: `pending()`), well
    before the next keepalive (60 s here) would wake them; every message stored, in order."""
    settings = make_settings(
        tls_broker, data_dir, ca=tls_broker.state_dir / "ca.crt", batch_max=5, keepalive=60
    )
    BridgeThread(settings).stop()  # the broker keeps the session: it queues what comes now
    sent = [Sent(f"devices/{unique}/t", b"m%03d" % i) for i in range(300)]
    publish(tls_broker, sent)
    bridge = BridgeThread(settings)
    wait_until(lambda: stored_count(data_dir) >= len(sent), 30, "the queued burst over TLS")
    bridge.stop()
    assert [m.record.payload for m in read_all(data_dir)[unique]] == [m.payload for m in sent]


def test_tls_without_the_right_ca_fails_verification(tls_broker: Broker, data_dir: Path) -> None:
    settings = make_settings(tls_broker, data_dir)  # system CAs do not know the test CA
    with pytest.raises(BrokerUnreachable, match="CERTIFICATE_VERIFY_FAILED") as caught:
        BridgeThread(settings)
    assert "--ca" in caught.value.message()


def test_missing_ca_file_is_a_config_error(tls_broker: Broker, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load({"ca": str(tmp_path / "nope.crt"), "broker": tls_broker.url}, {})


def test_ca_with_a_plain_broker_is_a_config_error(broker: Broker, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    with pytest.raises(ConfigError, match="for TLS"):
        config.load({"ca": str(ca), "broker": broker.url}, {})


def test_a_refused_restore_client_is_named_as_such(
    auth_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found in review: `mqtt-backup restore` said "the broker refused the bridge" when it was
    # itself refused (a user would go and look at the bridge's credentials).
    monkeypatch.setenv("MQTT_BACKUP_PASSWORD", "nope")
    result = CliRunner().invoke(
        app, ["restore", "dev-1", "--broker", f"mqtt://{BRIDGE_USER}@127.0.0.1:{auth_broker.port}"]
    )
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("mqtt-backup: the broker refused the restore client: "), line
    assert "nope" not in line
