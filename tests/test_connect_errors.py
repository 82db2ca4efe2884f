"""A broker that closes the connection before its CONNACK: the line names the broker and a way out.

Plain `mqtt://` to a TLS listener, or `mqtts://` without the client certificate a listener
requires: the broker drops the connection, and every command said only `cannot reach the broker:
connection lost: Connection reset by peer` (no address, no hint).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mqtt_backup.cli import app
from tests.conftest import Broker

COMMANDS = [["status", "--wait", "0.5"], ["restore", "dev-1", "--timeout", "1"]]


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("mqtt-backup: ")]
    return line


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("command", COMMANDS, ids=["status", "restore"])
def test_plain_mqtt_to_a_tls_listener_says_mqtts(
    tls_broker: Broker, command: list[str], protocol: str
) -> None:
    url = f"mqtt://127.0.0.1:{tls_broker.port}"
    result = CliRunner().invoke(app, [*command, "--broker", url, "--protocol", protocol])
    assert result.exit_code == 3, result.output
    line = _error_line(result.stderr)
    assert line.startswith(
        f"mqtt-backup: cannot reach the broker: {url} closed the connection before its CONNACK"
    ), line
    assert line.endswith("Try: check --broker (a TLS listener needs mqtts://) and the broker's log")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("command", COMMANDS, ids=["status", "restore"])
def test_no_client_certificate_for_a_listener_that_requires_one_says_cert_and_key(
    mtls_broker: Broker, command: list[str], protocol: str
) -> None:
    ca = mtls_broker.state_dir / "ca.crt"
    args = ["--broker", mtls_broker.url, "--protocol", protocol, "--ca", str(ca)]
    result = CliRunner().invoke(app, [*command, *args])
    assert result.exit_code == 3, result.output
    line = _error_line(result.stderr)
    assert line.startswith(
        f"mqtt-backup: cannot reach the broker: {mtls_broker.url} closed the connection before "
        "its CONNACK"
    ), line
    # The broker's alert (certificate required) or a bare reset, depending on timing.
    assert "--cert and --key" in line.split("Try: ")[1], line
