"""Status and membership on a real Mosquitto: the retained status, the will, one client id once.

Each test has its own namespace, so the retained status of other tests' bridges stays out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click.testing
import pytest
from typer.testing import CliRunner

from mqtt_backup import status as status_module
from mqtt_backup.cli import app
from mqtt_backup.config import BrokerTarget, parse_broker_url
from mqtt_backup.errors import EXIT_BROKER, EXIT_RUNTIME, ClientIdInUse
from mqtt_backup.mqtt import CodecConnection
from mqtt_backup.status import STATUS_PROTOCOL, ClientIdCheck, Identity, Member, read_members
from mqtt_backup.topics import status_topic
from tests.conftest import (
    BridgeThread,
    Broker,
    Sent,
    bridge_process,
    make_settings,
    publish,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("transport")

KEEPALIVE = 5  # the smallest the bridge takes: the will comes within 1.5 of them


def status(broker: Broker, namespace: str, *args: str) -> click.testing.Result:
    """`mqtt-backup status` in this process."""
    argv = ["status", "--broker", broker.url, "--namespace", namespace, *args]
    return CliRunner().invoke(app, argv)


def members(broker: Broker, namespace: str) -> dict[str, Member]:
    """The status messages now retained under the namespace, by instance name."""

    async def read() -> dict[str, Member]:
        async with CodecConnection(BrokerTarget(parse_broker_url(broker.url))) as conn:
            found = await read_members(conn, namespace)
        return {m.name: m for m in found.values()}

    return asyncio.run(read())


def state_of(broker: Broker, namespace: str, name: str) -> str | None:
    """The state a member last announced, or None."""
    member = members(broker, namespace).get(name)
    return None if member is None else str(member.body["state"])


def test_a_running_bridge_is_online_and_a_clean_stop_says_offline(
    broker: Broker, data_dir: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    ns = f"ns{unique}"
    settings = make_settings(broker, data_dir, namespace=ns, group="g1", instance="a")
    bridge = run_bridge(settings)
    wait_until(lambda: state_of(broker, ns, "a") == "online", 10, "the online status")
    result = status(broker, ns, "--json", "--wait", "0.5")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["topic"] == f"{ns}/status/g1/a"
    expected: dict[str, Any] = {
        "state": "online",
        "protocol": STATUS_PROTOCOL,
        "group": "g1",
        "instance": "a",
        "client_id": "mqtt-backup-g1-a",
        "partitions": ["p0", "p1", "p2"],
        "requests": f"{ns}/restore/+",
        "keepalive": 10,
    }
    assert {k: row[k] for k in expected} == expected
    assert row["started"].endswith("Z")
    table = status(broker, ns, "--wait", "0.5")
    assert table.exit_code == 0, table.output
    assert "mqtt-backup-g1-a" in table.stdout
    assert "online" in table.stdout
    bridge.stop()
    assert state_of(broker, ns, "a") == "offline"


def test_the_status_names_the_partitions_after_a_layout_change(
    broker: Broker, data_dir: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    # Found by a new user: `status --json` listed the old partitions after `partitions add`.
    ns = f"ns{unique}"
    bridge = run_bridge(make_settings(broker, data_dir, namespace=ns, group="g1", instance="a"))

    def partitions() -> list[str] | None:
        member = members(broker, ns).get("a")
        return None if member is None else list(member.body["partitions"])

    wait_until(lambda: partitions() == ["p0", "p1", "p2"], 10, "the online status")
    cli = CliRunner()
    added = cli.invoke(app, ["partitions", "add", "p3", "--data", str(data_dir)])
    assert added.exit_code == 0, added.output
    wait_until(lambda: partitions() == ["p0", "p1", "p2", "p3"], 10, lambda: f"{partitions()}")
    removed = cli.invoke(app, ["partitions", "remove", "p0", "--data", str(data_dir)])
    assert removed.exit_code == 0, removed.output
    wait_until(lambda: partitions() == ["p1", "p2", "p3"], 10, lambda: f"{partitions()}")
    assert state_of(broker, ns, "a") == "online"
    bridge.stop()
    assert state_of(broker, ns, "a") == "offline"
    assert partitions() == ["p1", "p2", "p3"]


def test_an_ungrouped_bridge_is_named_by_its_client_id(
    broker: Broker, data_dir: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    ns = f"ns{unique}"
    run_bridge(make_settings(broker, data_dir, namespace=ns, client_id=f"solo-{unique}"))
    wait_until(lambda: state_of(broker, ns, f"solo-{unique}") == "online", 10, "online")
    member = members(broker, ns)[f"solo-{unique}"]
    assert member.topic == f"{ns}/status/default/solo-{unique}"
    assert member.body["group"] == "default"


def test_status_without_any_bridge_exits_1(broker: Broker, unique: str) -> None:
    result = status(broker, f"ns{unique}", "--wait", "0.3")
    assert result.exit_code == EXIT_RUNTIME, result.output
    assert result.stderr.strip() == (
        f"mqtt-backup: no bridge announced itself: nothing on ns{unique}/status/+/+ within "
        "0.3 s. Try: check --broker and --namespace, that 'mqtt-backup run' runs there, or "
        "raise --wait"
    )


@pytest.mark.slow
def test_the_will_says_offline_within_one_and_a_half_keepalives_of_a_kill(
    broker: Broker, data_dir: Path, unique: str
) -> None:
    ns = f"ns{unique}"
    args = ("--namespace", ns, "--group", "g", "--instance", "k", "--keepalive", str(KEEPALIVE))
    proc = bridge_process(broker, data_dir, *args)
    try:
        wait_until(lambda: state_of(broker, ns, "k") == "online", 30, "the online status")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(
            lambda: state_of(broker, ns, "k") == "offline",
            1.5 * KEEPALIVE,
            "the will within 1.5 keepalives",
        )
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
# One transport: the wait is status.py's own connection, before either ingest transport connects.
@pytest.mark.parametrize("transport", ["asyncio"], indirect=True)
def test_a_second_bridge_with_an_online_client_id_waits_then_exits_3(
    broker: Broker, tmp_path: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    ns = f"ns{unique}"
    # The first's keepalive, 7 s, is above the second's 5: the wait shows whose counts (10.5 s,
    # not 7.5), in less time than a 10 s one took.
    first = make_settings(
        broker, tmp_path / "a", namespace=ns, client_id=f"twin-{unique}", keepalive=7
    )
    run_bridge(first)
    wait_until(lambda: state_of(broker, ns, f"twin-{unique}") == "online", 10, "online")
    args = ("--namespace", ns, "--client-id", f"twin-{unique}", "--keepalive", str(KEEPALIVE))
    started = time.monotonic()
    log = tmp_path / "second.log"
    second = bridge_process(broker, tmp_path / "b", *args, "--instance", "other", log=log)
    second.wait(60)
    second_out = log.read_text(encoding="utf-8")
    waited = time.monotonic() - started
    assert second.returncode == EXIT_BROKER, second_out
    assert f"client id twin-{unique} is online on {ns}/status/default/twin-{unique}" in second_out
    assert "Try: stop the other bridge" in second_out
    assert "Traceback" not in second_out
    # It waited for the will before giving up (the first keeps a 7 s keepalive).
    assert waited >= 1.5 * 7
    # The first never lost its session.
    assert state_of(broker, ns, f"twin-{unique}") == "online"


def test_a_second_bridge_starts_once_the_first_goes_offline(
    broker: Broker, tmp_path: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    ns = f"ns{unique}"
    first = run_bridge(make_settings(broker, tmp_path / "a", namespace=ns, client_id=f"t{unique}"))
    wait_until(lambda: state_of(broker, ns, f"t{unique}") == "online", 10, "online")
    second = make_settings(broker, tmp_path / "b", namespace=ns, client_id=f"t{unique}")
    # The first stops while the second waits for it (run_bridge returns once it connected).
    threading.Timer(1.0, first.stop).start()
    run_bridge(second)
    wait_until(lambda: state_of(broker, ns, f"t{unique}") == "online", 10, "the second online")
    assert members(broker, ns)[f"t{unique}"].body["pid"] > 0


# ---- the check started before the store opens (docs/design-notes.md, "Start-up") ---------------


def announce(broker: Broker, namespace: str, client_id: str, state: str) -> None:
    """A retained status for `client_id` as a live bridge of this machine (this process) says it."""
    body = {"state": state, "client_id": client_id, "keepalive": 1}
    body |= {"host": socket.gethostname(), "pid": os.getpid()}
    topic = status_topic(namespace, None, client_id)
    publish(broker, [Sent(topic, json.dumps(body).encode(), retain=True)])


def early_check(broker: Broker, namespace: str, client_id: str) -> ClientIdCheck:
    identity = Identity(namespace, client_id)
    return ClientIdCheck(BrokerTarget(parse_broker_url(broker.url)), identity, KEEPALIVE)


def test_a_check_started_early_waits_for_a_bridge_that_came_online_since(
    broker: Broker, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    ns, client_id = f"ns{unique}", f"early-{unique}"
    with caplog.at_level(logging.WARNING, logger="mqtt_backup.status"):
        check = early_check(broker, ns, client_id)
        wait_until(check.read.is_set, 10, "the check to read the retained statuses")
        # Online after the check started, before the bridge connects: the check answers for the
        # moment of connecting, so it waits for this one (1.5 x its keepalive of 1 s), then exit 3.
        announce(broker, ns, client_id, "online")
        assert "is online" not in caplog.text, "nothing is said before the bridge connects"
        started = time.monotonic()
        with pytest.raises(ClientIdInUse):
            check.result()
    assert time.monotonic() - started >= 1.5
    assert f"client id {client_id} is online on {ns}/status/default/{client_id}" in caplog.text


def test_a_check_started_early_passes_when_that_bridge_went_offline_before_connecting(
    broker: Broker, unique: str
) -> None:
    ns, client_id = f"ns{unique}", f"early-{unique}"
    check = early_check(broker, ns, client_id)
    wait_until(check.read.is_set, 10, "the check to read the retained statuses")
    announce(broker, ns, client_id, "online")
    announce(broker, ns, client_id, "offline")
    check.result()


def test_a_cancelled_check_ends_without_a_word(
    broker: Broker, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    ns, client_id = f"ns{unique}", f"early-{unique}"
    announce(broker, ns, client_id, "online")
    with caplog.at_level(logging.DEBUG):
        check = early_check(broker, ns, client_id)
        check.cancel()  # the store failed to open: no warning about a wait that never comes
    assert "is online" not in caplog.text


def test_a_check_whose_cancellation_is_swallowed_once_still_ends(
    broker: Broker, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found under load: `asyncio.wait_for` (3.11) swallowed the cancellation, `cancel()` hung.

    The fault is injected where the check waits for the bridge to connect: it swallows the first
    cancellation, as the library call did, and waits on; `cancel()` must still return.
    """
    swallowed = threading.Event()

    async def listen_swallowing_once(*_args: object) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(status_module, "_listen_until", listen_swallowing_once)
    check = early_check(broker, f"ns{unique}", f"early-{unique}")
    wait_until(check.read.is_set, 10, "the check to read the retained statuses")
    cancelling = threading.Thread(target=check.cancel, daemon=True)
    cancelling.start()
    cancelling.join(10)
    assert not cancelling.is_alive(), "cancel() did not return"
    assert swallowed.is_set()
