"""Broker credentials (password file, variable, URL), --metrics-bind and the log formats.

The run flags are generated from the config declarations by the CLI (not in this change), so the
settings are tested through `config.load` and the bridge API, and end to end through the CLI
with the `MQTT_BACKUP_*` variables, which the CLI passes to `config.load` today.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from mqtt_backup import config, logs
from mqtt_backup.config import LogFormat
from mqtt_backup.errors import BrokerRefused, ConfigError
from tests.conftest import (
    BRIDGE_PASSWORD,
    BRIDGE_USER,
    REPO,
    BridgeThread,
    Broker,
    Sent,
    make_settings,
    publish,
    stored_count,
    wait_until,
)

URL = f"mqtt://{BRIDGE_USER}@127.0.0.1:1883"


def _secret(tmp_path: Path, password: str, name: str = "password") -> Path:
    path = tmp_path / name
    path.write_text(password + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def _load(
    flags: dict[str, object] | None = None, env: dict[str, str] | None = None
) -> config.Settings:
    return config.load(flags or {}, env or {})


# ---- precedence -----------------------------------------------------------------------------


def test_the_password_file_wins_over_the_variable_and_the_url(tmp_path: Path) -> None:
    path = _secret(tmp_path, "from-file")
    settings = _load(
        {"broker": f"mqtt://{BRIDGE_USER}:from-url@h:1", "password_file": str(path)},
        {"MQTT_BACKUP_PASSWORD": "from-env"},
    )
    assert settings.broker_address.password == "from-file"
    assert settings.broker_address.username == BRIDGE_USER


def test_the_password_file_may_come_from_the_environment(tmp_path: Path) -> None:
    path = _secret(tmp_path, "from-file")
    settings = _load(env={"MQTT_BACKUP_BROKER": URL, "MQTT_BACKUP_PASSWORD_FILE": str(path)})
    assert settings.broker_address.password == "from-file"


def test_the_variable_wins_over_the_url() -> None:
    settings = _load(
        {"broker": f"mqtt://{BRIDGE_USER}:from-url@h:1"}, {"MQTT_BACKUP_PASSWORD": "from-env"}
    )
    assert settings.broker_address.password == "from-env"


def test_the_url_password_is_the_last_resort() -> None:
    assert _load({"broker": "mqtt://u:p%40ss@h:1"}).broker_address.password == "p@ss"


def test_only_the_first_line_of_the_file_is_the_password(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text(" spaces kept \r\nsecond line\n", encoding="utf-8")
    settings = _load({"broker": URL, "password_file": str(path)})
    assert settings.broker_address.password == " spaces kept "


def test_an_empty_password_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty") as caught:
        _load({"broker": URL, "password_file": str(path)})
    assert caught.value.exit_code == 2


def test_a_missing_password_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"password-file.*does not exist"):
        _load({"broker": URL, "password_file": str(tmp_path / "nope")})


def test_a_password_without_a_user_name_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a user name"):
        _load({"broker": "mqtt://h:1", "password_file": str(_secret(tmp_path, "x"))})


def test_the_password_has_no_flag_and_no_file_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MQTT_BACKUP_PASSWORD"):
        _load({"password": "visible-in-ps"})
    toml = tmp_path / "c.toml"
    toml.write_text('password = "x"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown key 'password'.*password_file"):
        config.load({}, {}, toml)
    assert config.declared("password").env_only


def test_the_password_is_in_no_repr_and_no_error() -> None:
    settings = _load({"broker": URL}, {"MQTT_BACKUP_PASSWORD": "hunter2"})
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.broker_address)
    with pytest.raises(ConfigError) as caught:
        _load({"broker": "mqtt://h:1"}, {"MQTT_BACKUP_PASSWORD": "hunter2"})
    assert "hunter2" not in caught.value.message()


def test_a_password_in_the_broker_flag_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    config._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="mqtt_backup.config"):
        _load({"broker": "mqtt://u:hunter2@h:1"})
        _load({"broker": "mqtt://u:hunter2@h:1"})
        _load(env={"MQTT_BACKUP_BROKER": "mqtt://u:hunter2@h:1"})  # not in ps: no warning
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "--password-file" in warnings[0]
    assert "visible" in warnings[0]
    assert "hunter2" not in warnings[0]


def test_no_warning_without_a_password_in_the_flag(caplog: pytest.LogCaptureFixture) -> None:
    config._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="mqtt_backup.config"):
        _load({"broker": URL}, {"MQTT_BACKUP_PASSWORD": "x"})
    assert caplog.records == []


# ---- against a password-protected Mosquitto -------------------------------------------------


@pytest.mark.usefixtures("transport")
def test_the_bridge_logs_in_with_the_password_file(
    auth_broker: Broker, data_dir: Path, tmp_path: Path, unique: str
) -> None:
    path = _secret(tmp_path, BRIDGE_PASSWORD)
    url = f"mqtt://{BRIDGE_USER}@127.0.0.1:{auth_broker.port}"
    settings = make_settings(auth_broker, data_dir, broker=url, password_file=path)
    bridge = BridgeThread(settings)
    publish(auth_broker, [Sent(f"devices/{unique}/t", b"1")])
    wait_until(lambda: stored_count(data_dir) >= 1, 20, "the message")
    bridge.stop()


@pytest.mark.usefixtures("transport")
def test_a_wrong_password_file_is_refused(
    auth_broker: Broker, data_dir: Path, tmp_path: Path
) -> None:
    url = f"mqtt://{BRIDGE_USER}:{quote(BRIDGE_PASSWORD, safe='')}@127.0.0.1:{auth_broker.port}"
    path = _secret(tmp_path, "wrong")  # the file wins over the right password in the URL
    settings = make_settings(auth_broker, data_dir, broker=url, password_file=path)
    with pytest.raises(BrokerRefused) as caught:
        BridgeThread(settings)
    assert "wrong" not in caught.value.message()


class CliBridge:
    """`mqtt-backup run` in a subprocess, its output in files (a pipe could fill up and block)."""

    def __init__(self, data: Path, env: dict[str, str], *args: str) -> None:
        self.out, self.err = data.parent / "stdout", data.parent / "stderr"
        cmd = [sys.executable, "-m", "mqtt_backup", "run", "--data", str(data)]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [*cmd, "--log-level", "debug", *args],
                stdout=out,
                stderr=err,
                cwd=REPO,
                env={**os.environ, **env},
            )

    def running(self) -> bool:
        """The bridge logged that it runs (its signal handlers are set by then)."""
        return "mqtt-backup running" in self.err.read_text(encoding="utf-8")

    def stop(self) -> str:
        """SIGTERM, then everything it printed."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        text = self.out.read_text(encoding="utf-8") + self.err.read_text(encoding="utf-8")
        assert self.proc.returncode == 0, text
        return text


def _all_files_text(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("source", ["MQTT_BACKUP_PASSWORD", "MQTT_BACKUP_PASSWORD_FILE"])
def test_the_password_is_never_printed_nor_stored(
    auth_broker: Broker, data_dir: Path, tmp_path: Path, unique: str, source: str
) -> None:
    url = f"mqtt://{BRIDGE_USER}@127.0.0.1:{auth_broker.port}"
    value = (
        BRIDGE_PASSWORD
        if source == "MQTT_BACKUP_PASSWORD"
        else str(_secret(tmp_path, BRIDGE_PASSWORD))
    )
    bridge = CliBridge(data_dir, {"MQTT_BACKUP_BROKER": url, source: value})
    try:
        wait_until(bridge.running, 30, "the CLI bridge to run")
        publish(auth_broker, [Sent(f"devices/{unique}/t", b"x")])
        wait_until(lambda: stored_count(data_dir) >= 1, 30, "the message via the CLI bridge")
    finally:
        err = bridge.stop()
    assert "DEBUG" in err  # the debug log was written
    assert BRIDGE_PASSWORD not in err
    assert quote(BRIDGE_PASSWORD, safe="") not in err
    assert BRIDGE_PASSWORD.encode() not in _all_files_text(data_dir)


def test_a_password_in_the_broker_flag_warns_on_stderr(auth_broker: Broker, data_dir: Path) -> None:
    url = f"mqtt://{BRIDGE_USER}:{quote(BRIDGE_PASSWORD, safe='')}@127.0.0.1:{auth_broker.port}"
    bridge = CliBridge(data_dir, {}, "--broker", url)
    try:
        wait_until(bridge.running, 30, "the CLI bridge to run")
    finally:
        err = bridge.stop()
    warned = [line for line in err.splitlines() if "visible" in line]
    assert len(warned) == 1, err
    assert "--password-file" in warned[0]
    assert BRIDGE_PASSWORD not in err


# ---- --metrics-bind -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "where"),
    [
        ({}, None),
        ({"metrics_port": 9464}, ("127.0.0.1", 9464)),
        ({"metrics_bind": "0.0.0.0:9100"}, ("0.0.0.0", 9100)),
        ({"metrics_bind": "0.0.0.0", "metrics_port": 9100}, ("0.0.0.0", 9100)),
        ({"metrics_bind": "[::]:9100"}, ("::", 9100)),
        ({"metrics_bind": "10.0.0.1:9100", "metrics_port": 9100}, ("10.0.0.1", 9100)),
    ],
)
def test_metrics_address(flags: dict[str, object], where: tuple[str, int] | None) -> None:
    assert _load(flags).metrics_address == where


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"metrics_bind": "0.0.0.0"}, "has no port"),
        ({"metrics_bind": "h:1", "metrics_port": 2}, "different ports"),
        ({"metrics_bind": "h:99999"}, "from 1 to 65535"),
        ({"metrics_bind": ":9100"}, "no host"),
        ({"metrics_bind": "[::1"}, "not HOST:PORT"),
    ],
)
def test_bad_metrics_bind(flags: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _load(flags)


# ---- log formats ----------------------------------------------------------------------------


def test_json_logs_are_one_object_per_line_with_the_event_fields() -> None:
    stream = io.StringIO()
    handler = logs.configure("info", LogFormat.JSON, stream=stream)
    try:
        logging.getLogger("mqtt_backup.test").info("stored %d", 3, extra={"partition": "p0"})
        logging.getLogger("mqtt_backup.test").debug("below the level")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    event = json.loads(lines[0])
    assert event["level"] == "info"
    assert event["logger"] == "mqtt_backup.test"
    assert event["message"] == "stored 3"
    assert event["partition"] == "p0"
    assert event["time"].endswith("+00:00")


@pytest.mark.parametrize("log_format", list(LogFormat))
def test_no_log_line_shows_the_password(log_format: LogFormat) -> None:
    stream = io.StringIO()
    handler = logs.configure("debug", log_format, secrets=["hunter2"], stream=stream)
    try:
        log = logging.getLogger("some.library")
        log.debug("connecting with %s", "user:hunter2", extra={"url": "mqtt://u:hunter2@h"})
        try:
            int("hunter2")
        except ValueError:
            log.exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    assert "hunter2" not in text
    assert "***" in text
    assert "ValueError" in text


@pytest.mark.parametrize("log_format", list(LogFormat))
def test_a_password_that_is_also_a_word_leaves_the_bridge_s_own_words_alone(
    log_format: LogFormat,
) -> None:
    # Found by a new-user run: `run --broker mqtt://u:p@host` warned "the ***assword in
    # --broker is visible ... ***ut it in a file ... ***ass --***assword-file FILE": masking the
    # secret inside the bridge's own text mangled the line and, by where the stars fell, showed
    # the password. Only what a call logs as its arguments (and fields) can hold the secret.
    stream = io.StringIO()
    handler = logs.configure("info", log_format, secrets=["pass"], stream=stream)
    try:
        config._WARNED.clear()
        _load({"broker": "mqtt://u:pass@h:1"})  # the real warning
        log = logging.getLogger("some.library")
        log.info("connecting with %s, then %r, %d times", "u:pass@h", "pass", 3)
        log.info("keyed %(url)s", {"url": "mqtt://u:pass@h"})
        log.info("preformatted mqtt://u:pass@h")  # no arguments: the whole text is masked
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    if log_format == LogFormat.JSON:
        lines = [json.loads(line)["message"] for line in lines]
    warning, args, keyed, preformatted = lines
    assert "the password in --broker is visible" in warning, warning
    assert "pass --password-file FILE (or set MQTT_BACKUP_PASSWORD)" in warning, warning
    assert args.endswith("connecting with u:***@h, then '***', 3 times"), args
    assert keyed.endswith("keyed mqtt://u:***@h"), keyed
    assert preformatted.endswith("preformatted mqtt://u:***@h"), preformatted


def test_a_password_of_digits_is_masked_in_a_number_argument_too() -> None:
    stream = io.StringIO()
    handler = logs.configure("info", LogFormat.TEXT, secrets=["1883"], stream=stream)
    try:
        logging.getLogger("some.library").info("port %d, %s", 1883, "x")
    finally:
        logging.getLogger().removeHandler(handler)
    assert stream.getvalue().rstrip().endswith("port ***, x"), stream.getvalue()


def test_the_error_line_follows_the_log_format_and_masks_secrets() -> None:
    assert logs.error_line("mqtt-backup: plain") == "mqtt-backup: plain"  # not configured
    handler = logs.configure("info", LogFormat.JSON, secrets=["hunter2"], stream=io.StringIO())
    try:
        line = json.loads(logs.error_line("mqtt-backup: cannot log in as u:hunter2"))
        assert line["level"] == "error"
        assert line["message"] == "mqtt-backup: cannot log in as u:***"
    finally:
        logging.getLogger().removeHandler(handler)
    assert logs.error_line("mqtt-backup: plain") == "mqtt-backup: plain"  # its handler is gone
