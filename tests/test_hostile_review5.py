"""Hostile review of the paho commits between units (and the folded MQTT value types).

The paho transport (`--protocol 3.1.1`, `--transport paho`) now stores and acknowledges what it
holds between the units of a long operation. These tests attack that with real processes and a
real Mosquitto: a kill -9 in the middle of a partition add must lose nothing the bridge
acknowledged, and a re-run must finish the add. Faults (a slow copy, a small unit) are injected
into the bridge process only to stretch the operation over many units.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from typer.testing import CliRunner

from mqtt_backup import operations
from mqtt_backup.cli import app
from mqtt_backup.config import Transport
from mqtt_backup.control import RemoteError, call
from mqtt_backup.mqtt.ingest import PahoIngest
from mqtt_backup.storage import Store, ballast, checks, moves
from mqtt_backup.storage import units as units_module
from mqtt_backup.storage.units import Units, step
from tests.conftest import (
    REPO,
    BridgeThread,
    Broker,
    Sent,
    bridge_process,
    device_client,
    make_settings,
    make_test_ca,
    publish,
    read_all,
    stored_count,
    wait_until,
)
from tests.faulty import Faults
from tests.test_operations import fill
from tests.test_production_broker import _client_certificate
from tests.test_scaleout_restore import restore as scaleout_restore
from tests.test_scaleout_restore import two_instances
from tests.test_status import state_of

pytestmark = pytest.mark.slow  # real processes killed by signals

# The bridge with small units and a slow copy: an add of ~100 devices takes seconds, in many
# units, so a kill lands in its middle and commits come between its units meanwhile.
_SLOW_ADD = """
import sys, time
from mqtt_backup.storage import partition, units
units.UNIT_KEYS = 20
_copy = partition.Partition.copy_keys_from
def _slow(self, *args, **kwargs):
    time.sleep(0.05)
    return _copy(self, *args, **kwargs)
partition.Partition.copy_keys_from = _slow
sys.argv = ["mqtt-backup", *sys.argv[1:]]
from mqtt_backup.cli import main
main()
"""


def _slow_bridge(broker: Broker, data: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-c", _SLOW_ADD, "run", "--broker", broker.url, "--data", str(data)]
    out = log.open("ab")
    return subprocess.Popen(
        [*cmd, "--partitions", "3", "--batch-max", "50", "--batch-ms", "10", *args],
        stdout=out,
        stderr=out,
        cwd=REPO,
    )


def _wait_running(proc: subprocess.Popen[bytes], log: Path) -> None:
    def running() -> bool:
        assert proc.poll() is None, log.read_text()
        return log.exists() and log.read_text().count("mqtt-backup running") >= runs

    runs = log.read_text().count("mqtt-backup running") + 1 if log.exists() else 1
    wait_until(running, 20, "the bridge to start")


def _publish_in_thread(
    broker: Broker, messages: list[Sent], ledger: list[Sent]
) -> threading.Thread:
    """Publish QoS 1, a little at a time; a message enters the ledger once the broker has it."""

    async def publish() -> None:
        async with device_client(broker) as client:
            for i, msg in enumerate(messages):
                await client.publish(msg.topic, msg.payload, qos=1)
                ledger.append(msg)
                if i % 20 == 19:
                    await asyncio.sleep(0.02)

    thread = threading.Thread(target=lambda: asyncio.run(publish()), daemon=True)
    thread.start()
    return thread


def _publish_to(
    proc: subprocess.Popen[bytes],
    log: Path,
    broker: Broker,
    data: Path,
    messages: list[Sent],
    ledger: list[Sent],
) -> threading.Thread:
    """Once the bridge runs, publish in a thread (`_publish_in_thread`) until 50 are stored."""
    before = stored_count(data)
    _wait_running(proc, log)
    wait_until((data / "control.sock").exists, 20, "the control socket")
    publisher = _publish_in_thread(broker, messages, ledger)
    wait_until(lambda: stored_count(data) >= before + 50, 30, "ingest before the add")
    return publisher


def _add_in_thread(data: Path) -> tuple[threading.Thread, list[Any]]:
    """`partitions-add p3` through the control socket in a thread; its answer, or what ended it."""
    answers: list[Any] = []

    def add() -> None:
        try:
            answers.append(call(data, "partitions-add", {"name": "p3"}, timeout=120))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            answers.append(exc)

    adding = threading.Thread(target=add, daemon=True)
    adding.start()
    return adding, answers


def _assert_whole(data: Path, unique: str, ledger: list[Sent]) -> None:
    """Every ledgered message stored, none twice unflagged, every device where placement says."""
    stored = [m for msgs in read_all(data).values() for m in msgs if unique in m.record.topic]
    copies = Counter(m.record.payload for m in stored)
    missing = [m.payload for m in ledger if copies[m.payload] == 0]
    assert missing == [], f"{len(missing)} acknowledged messages lost"
    firsts = Counter(m.record.payload for m in stored if not m.record.dup)
    assert all(n == 1 for n in firsts.values()), "a message stored twice without the DUP flag"
    store = Store.open(data, create=False)
    try:
        assert moves.rebalance(store, dry_run=True).devices == 0, "a copy left behind"
    finally:
        store.close()
    assert checks.verify(data).ok


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_kill_9_during_an_add_on_paho_loses_nothing_acknowledged_between_units(
    broker: Broker, data_dir: Path, unique: str, tmp_path: Path, protocol: str
) -> None:
    """Messages acknowledged between the units of an add survive a kill -9 in its middle.

    The add is killed after the bridge stored messages during it (on paho, only the commits
    between units store anything while an operation runs). After a restart every message the
    broker took is stored (the broker resends what the bridge had not acknowledged; one it had
    acknowledged and lost would never come back), and running the add again finishes it.
    """
    fill(data_dir, devices=200, per_device=2)
    before = stored_count(data_dir)
    log = tmp_path / "bridge.log"
    proc = _slow_bridge(broker, data_dir, log, "--protocol", protocol, "--transport", "paho")
    messages = [Sent(f"devices/{unique}-{i % 20}/t", b"m%d" % i) for i in range(3000)]
    ledger: list[Sent] = []
    publisher = _publish_to(proc, log, broker, data_dir, messages, ledger)
    adding, answers = _add_in_thread(data_dir)  # the kill ends its call: an error in answers
    started = stored_count(data_dir)
    # Stored while the add runs: acknowledged between its units (nothing else commits then).
    wait_until(lambda: stored_count(data_dir) >= started + 200, 60, "commits during the add")
    assert not answers, "the add ended before the kill: make it slower"
    proc.kill()
    assert proc.wait(10) == -signal.SIGKILL
    adding.join(30)
    publisher.join(120)
    assert len(ledger) == len(messages)

    proc = bridge_process(broker, data_dir, "--protocol", protocol, "--transport", "paho", log=log)
    try:
        _wait_running(proc, log)
        wait_until((data_dir / "control.sock").exists, 20, "the control socket")
        wait_until(
            lambda: stored_count(data_dir) >= before + len(messages), 60, "every ledgered message"
        )
        assert call(data_dir, "partitions-add", {"name": "p3"}, timeout=120)["added"] == "p3"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    _assert_whole(data_dir, unique, ledger)


def test_sigterm_during_an_add_on_paho_stops_it_between_units_and_stores_what_it_held(
    broker: Broker, data_dir: Path, unique: str, tmp_path: Path
) -> None:
    """A SIGTERM in the middle of an add on 3.1.1: exit 0, the add told it stopped, nothing lost.

    The stop waits for the unit under way (in a worker thread), then ends the operation there
    (it used to run the whole add first); what arrived meanwhile is stored between its units or
    at the shutdown, every message the broker took is stored after a restart, and the add run
    again through the restarted bridge finishes.
    """
    fill(data_dir, devices=200, per_device=2)
    before = stored_count(data_dir)
    log = tmp_path / "bridge.log"
    proc = _slow_bridge(broker, data_dir, log, "--protocol", "3.1.1")
    messages = [Sent(f"devices/{unique}-{i % 20}/t", b"s%d" % i) for i in range(1500)]
    ledger: list[Sent] = []
    publisher = _publish_to(proc, log, broker, data_dir, messages, ledger)
    adding, answers = _add_in_thread(data_dir)
    started = stored_count(data_dir)
    wait_until(lambda: stored_count(data_dir) >= started + 100, 60, "commits during the add")
    assert not answers, "the add ended before the signal: make it slower"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, log.read_text()
    adding.join(30)
    assert answers, "the add got no answer"
    assert isinstance(answers[0], RemoteError), answers[0]
    assert "the partitions-add stopped between two steps" in answers[0].message()
    assert "Traceback" not in log.read_text()
    publisher.join(120)
    assert len(ledger) == len(messages)

    cmd = [
        sys.executable,
        "-m",
        "mqtt_backup",
        "run",
        "--broker",
        broker.url,
        "--protocol",
        "3.1.1",
    ]
    with log.open("ab") as out:  # the manifest says how many partitions: no --partitions
        proc = subprocess.Popen([*cmd, "--data", str(data_dir)], stdout=out, stderr=out, cwd=REPO)
    try:
        _wait_running(proc, log)
        wait_until(
            lambda: stored_count(data_dir) >= before + len(messages), 60, "every ledgered message"
        )
        manifest = json.loads((data_dir / "manifest.json").read_text())
        if "p3" in [spec["name"] for spec in manifest["partitions"]]:  # stopped after its switch
            call(data_dir, "rebalance", {}, timeout=120)  # moves what the add had left
        else:
            assert call(data_dir, "partitions-add", {"name": "p3"}, timeout=120)["added"] == "p3"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    _assert_whole(data_dir, unique, ledger)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_the_broker_going_away_in_the_middle_of_an_operation_on_paho_loses_nothing(
    own_broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: Callable[..., BridgeThread],
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
) -> None:
    """The broker stops between two units of an add, with messages held; the add still ends.

    What was held when the connection went is stored (its acks are void: the broker resends those
    messages, flagged), nothing is lost, none is stored twice unflagged, and the bridge reconnects
    once the broker is back.
    """
    monkeypatch.setattr(units_module, "UNIT_KEYS", 20)
    fill(data_dir, devices=200, per_device=2)
    settings = make_settings(own_broker, data_dir, protocol=protocol, transport=Transport.PAHO)
    bridge = run_bridge(settings)
    wait_until((data_dir / "control.sock").exists, 20, "the control socket")
    transport = bridge.bridge._transport
    real = operations.units
    first = [Sent(f"devices/{unique}-{i % 7}/t", b"a%d" % i) for i in range(30)]
    second = [Sent(f"devices/{unique}-{i % 7}/t", b"b%d" % i) for i in range(30)]

    def read(count: int) -> Callable[[], bool]:
        def check() -> bool:  # the loop reads on during the unit
            return bridge.bridge.snapshot().received >= count

        return check

    def with_the_broker_going(
        store: Store, op: str, args: Mapping[str, Any]
    ) -> Units[dict[str, Any]]:
        work = real(store, op, args)
        assert step(work) is None, "the add takes more than one unit"
        received, acked = bridge.bridge.snapshot().received, bridge.bridge.snapshot().acknowledged
        publish(own_broker, first)
        wait_until(read(received + len(first)), 20, "the first messages held")
        yield  # stored and acknowledged here
        assert bridge.bridge.snapshot().acknowledged >= acked + len(first)
        assert step(work) is None, "the add takes more than two units"
        publish(own_broker, second)
        wait_until(read(received + 60), 20, "the second messages held")
        own_broker.stop()

        def gone() -> bool:
            return not transport.connected

        wait_until(gone, 20, "the bridge to notice the broker gone")
        yield  # no connection to acknowledge on: held
        return (yield from work)

    monkeypatch.setattr(operations, "units", with_the_broker_going)
    answer = call(data_dir, "partitions-add", {"name": "p3"}, timeout=60)
    assert answer["added"] == "p3"
    monkeypatch.setattr(operations, "units", real)
    own_broker.start()
    wait_until(lambda: transport.connected, 30, "the bridge to reconnect")
    sent = {m.payload for m in first + second}

    def all_stored() -> bool:
        stored = read_all(data_dir)
        return sent <= {m.record.payload for msgs in stored.values() for m in msgs}

    wait_until(all_stored, 30, "every message stored")
    bridge.stop()
    stored = [m for msgs in read_all(data_dir).values() for m in msgs if unique in m.record.topic]
    firsts = Counter(m.record.payload for m in stored if not m.record.dup)
    assert set(firsts) == sent
    assert all(n == 1 for n in firsts.values()), firsts
    assert checks.verify(data_dir).ok


# ---- the broker target (address, protocol, TLS files) reaching every connection ----------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_every_connection_of_every_command_takes_the_client_certificate(
    mtls_broker: Broker, data_dir: Path, unique: str, tmp_path: Path, protocol: str
) -> None:
    """On a broker that requires a client certificate, each command gets through with one.

    `run` (its client-id check, ingest and restore service), `simulate`, `status` and `restore`
    each open their own connection from the same --ca/--cert/--key and --protocol: one that
    dropped the certificate or the protocol fails here (the broker refuses the handshake).
    """
    cert, key = _client_certificate(mtls_broker.state_dir, f"bridge-{unique}")
    ca = mtls_broker.state_dir / "ca.crt"
    tls = ["--ca", str(ca), "--cert", str(cert), "--key", str(key), "--protocol", protocol]
    url = ["--broker", mtls_broker.url]
    log = tmp_path / "bridge.log"
    cmd = [sys.executable, "-m", "mqtt_backup", "run", *url, *tls, "--data", str(data_dir)]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=REPO)
    try:
        _wait_running(proc, log)
        wait_until(lambda: "restore service listening" in log.read_text(), 20, "restore service")
        runner = CliRunner()
        fleet = ["--devices", "1", "--rate", "20", "--duration", "0.5", "--prefix", unique[:8]]
        simulated = runner.invoke(app, ["simulate", *url, *tls, *fleet])
        assert simulated.exit_code == 0, simulated.output

        async def send() -> None:
            params = aiomqtt.TLSParameters(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
            async with aiomqtt.Client("127.0.0.1", mtls_broker.port, tls_params=params) as client:
                await client.publish(f"devices/{unique}/t", b"over mTLS", qos=1)

        asyncio.run(send())
        wait_until(lambda: stored_count(data_dir) >= 1, 20, "the message over mTLS")
        status = runner.invoke(app, ["status", *url, *tls, "--json"])
        assert status.exit_code == 0, status.output
        assert "online" in status.stdout
        restored = runner.invoke(app, ["restore", unique, *url, *tls, "--timeout", "20"])
        assert restored.exit_code == 0, restored.output
        lines = [json.loads(line) for line in restored.stdout.splitlines()]
        assert [line["payload"] for line in lines] == ["over mTLS"], lines
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


# ---- a deleting operation on a full disk owns the room it frees, on paho too -----------------


@pytest.mark.parametrize(
    ("client", "protocol"), [(Transport.ASYNCIO, "5"), (Transport.PAHO, "3.1.1")]
)
def test_no_commit_comes_between_the_units_of_a_prune_that_frees_a_full_disk(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: Callable[..., BridgeThread],
    monkeypatch: pytest.MonkeyPatch,
    client: Transport,
    protocol: str,
) -> None:
    """The disk is full (not stalled): a prune releases the ballast and owns what it frees.

    Messages that arrive during its units are held, not written between them (a commit there
    would take the room the prune frees before its reclaim); they are stored once it ends.
    """
    monkeypatch.setattr(units_module, "UNIT_KEYS", 20)
    fill(data_dir, devices=200, per_device=2)
    faults = Faults()
    settings = make_settings(broker, data_dir, protocol=protocol, transport=client)
    bridge = run_bridge(settings, wrap_store=faults.wrap)
    wait_until((data_dir / "control.sock").exists, 20, "the control socket")
    monkeypatch.setattr(ballast, "short_of_space", lambda _data: True)  # the disk is full
    real = operations.units
    sent = [Sent(f"devices/{unique}/t", b"h%d" % i) for i in range(5)]
    during: list[int] = []

    def watched(store: Store, op: str, args: Mapping[str, Any]) -> Units[dict[str, Any]]:
        work = real(store, op, args)
        assert step(work) is None, "the prune takes more than one unit"
        assert store.freeing_space, "the full disk made the prune own the room"
        writes = faults.calls["write"]
        received = bridge.bridge.snapshot().received
        publish(broker, sent)

        def read() -> bool:  # the loop reads on during the unit
            return bridge.bridge.snapshot().received >= received + len(sent)

        wait_until(read, 20, "the messages held during the prune")
        while True:
            yield
            during.append(faults.calls["write"] - writes)
            done = step(work)
            if done is not None:
                return done.result

    monkeypatch.setattr(operations, "units", watched)
    answer = call(data_dir, "prune", {"max_bytes_per_device": 10}, timeout=60)
    pruned = answer["messages"]
    assert pruned > 0
    assert during, "units came after the messages arrived"
    assert set(during) == {0}, f"writes between the units of the prune: {during}"
    left = 400 - pruned + len(sent)
    wait_until(lambda: stored_count(data_dir) == left, 30, "the held messages stored")
    bridge.stop()
    assert not bridge.bridge.store.freeing_space


# ---- acknowledgements in receive order across units and a failed commit between them ---------


def _record_acks(
    bridge: BridgeThread, unique: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[int], list[int]]:
    """Packet ids of this test's messages as the transport offers them, and of every ack sent.

    Offered, not paho's on_message: the transport decodes plain PUBLISH packets itself.
    """
    transport = bridge.bridge._transport
    assert isinstance(transport, PahoIngest)
    client = transport._client
    pipeline = bridge.bridge.pipeline
    received: list[int] = []
    acked: list[int] = []
    offer, ack = pipeline.offer, client.ack

    def receiving(record: Any, token: Any, replayed: bool = False) -> None:  # on the loop
        if unique in record.topic:
            received.append(token[1])
        offer(record, token, replayed)

    def acking(mid: int, qos: int) -> Any:
        acked.append(mid)
        return ack(mid, qos)

    def acking_all(mids: Sequence[int]) -> None:  # a batch's PUBACKs, in one write
        acked.extend(mids)
        puback_all(mids)

    puback_all = client.puback_all
    monkeypatch.setattr(pipeline, "offer", receiving)
    monkeypatch.setattr(client, "ack", acking)
    monkeypatch.setattr(client, "puback_all", acking_all)
    return received, acked


def test_paho_acks_in_receive_order_across_units_and_a_failed_commit_between_them(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: Callable[..., BridgeThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MQTT 3.1.1 wants PUBACKs in the order the PUBLISHes came (MQTT-4.6.0-2).

    Messages stream in while an add runs in units on paho; a commit between two of its units
    fails (disk full: the add fails, exit 4) and storage comes back. Every message is
    acknowledged exactly once, in the order it was received, and stored.
    """
    monkeypatch.setattr(units_module, "UNIT_KEYS", 20)
    fill(data_dir, devices=200, per_device=2)
    faults = Faults()
    settings = make_settings(broker, data_dir, protocol="3.1.1")
    bridge = run_bridge(settings, wrap_store=faults.wrap)
    wait_until((data_dir / "control.sock").exists, 20, "the control socket")
    received, acked = _record_acks(bridge, unique, monkeypatch)
    real = operations.units
    units_seen = [0]
    armed: list[bool] = []

    def failing_once(store: Store, op: str, args: Mapping[str, Any]) -> Units[dict[str, Any]]:
        work = real(store, op, args)
        while (done := step(work)) is None:
            units_seen[0] += 1
            time.sleep(0.05)  # a unit's worth of time: the publisher's messages arrive meanwhile
            # The commit after this unit fails: from the 6th unit on, at the first one that has
            # messages held (a loaded machine may have stored everything by the 6th).
            if units_seen[0] >= 6 and bridge.bridge.pipeline.pending and not armed:
                armed.append(True)
                faults.failing = True
            yield
        return done.result

    sent = [Sent(f"devices/{unique}-{i % 9}/t", b"o%d" % i) for i in range(600)]
    ledger: list[Sent] = []
    publisher = _publish_in_thread(broker, sent, ledger)
    wait_until(lambda: len(received) >= 50, 30, "messages before the add")
    monkeypatch.setattr(operations, "units", failing_once)
    answer: Any
    try:
        answer = call(data_dir, "partitions-add", {"name": "p3"}, timeout=60)
    except RemoteError as exc:
        answer = exc
    faults.failing = False
    publisher.join(60)
    assert len(ledger) == len(sent)
    assert armed, "no unit from the 6th on had messages held: nothing was tested"
    assert isinstance(answer, RemoteError), "the commit between units failed the add"
    assert answer.exit_code == 4, answer
    monkeypatch.setattr(operations, "units", real)
    assert call(data_dir, "partitions-add", {"name": "p3"}, timeout=60)["added"] == "p3"
    wait_until(lambda: len(received) >= len(sent), 30, "every message received")
    wait_until(lambda: set(received) <= set(acked), 30, "every message acknowledged")
    bridge.stop()
    ours = set(received)
    in_ack_order = [mid for mid in acked if mid in ours]
    assert in_ack_order == received, "acknowledged out of receive order, or twice"
    assert faults.calls["write_failed"] >= 1, "the failure was injected between units"
    stored = {m.record.payload for msgs in read_all(data_dir).values() for m in msgs}
    assert {m.payload for m in sent} <= stored


# ---- the same bad TLS input, the same answer from every command ------------------------------


def _error_line(stderr: str) -> str:
    """The one error line (simulate says what it will do first), without a traceback."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("mqtt-backup: ")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize(
    "command",
    [
        ["status", "--wait", "0.5"],
        ["restore", "dev-1", "--timeout", "1"],
        ["simulate", "--devices", "1", "--duration", "0.3"],
    ],
    ids=["status", "restore", "simulate"],
)
def test_a_client_key_that_does_not_match_is_a_configuration_error_in_every_command(
    tls_broker: Broker, tmp_path: Path, command: list[str], protocol: str
) -> None:
    """--cert with the wrong --key: exit 2, `cannot load the TLS files`, whatever the command.

    `simulate` (aiomqtt) said `cannot reach the broker ... Try: check --broker and that the
    broker runs` with exit 3: the broker was never the problem.
    """
    state = tmp_path / "ca"
    state.mkdir()
    make_test_ca(state)
    cert, _ = _client_certificate(state, "client")
    ca = tls_broker.state_dir / "ca.crt"
    args = ["--broker", tls_broker.url, "--protocol", protocol, "--ca", str(ca)]
    args += ["--cert", str(cert), "--key", str(state / "ca.key")]  # not the certificate's key
    result = CliRunner().invoke(app, [*command, *args])
    assert result.exit_code == 2, result.output
    line = _error_line(result.stderr)
    assert line.startswith("mqtt-backup: bad configuration: cannot load the TLS files:"), line
    # Which file: the certificate and the key that do not belong together.
    assert f"client certificate {cert} with key {state / 'ca.key'}" in line, line


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize(
    "command",
    [
        ["status", "--wait", "0.5"],
        ["restore", "dev-1", "--timeout", "1"],
        ["simulate", "--devices", "1", "--duration", "0.3"],
    ],
    ids=["status", "restore", "simulate"],
)
def test_a_broker_certificate_not_trusted_says_check_ca_in_every_command(
    tls_broker: Broker, command: list[str], protocol: str
) -> None:
    """No --ca for a broker whose CA the system does not trust: exit 3, `Try: check --ca`."""
    args = ["--broker", tls_broker.url, "--protocol", protocol]
    result = CliRunner().invoke(app, [*command, *args])
    assert result.exit_code == 3, result.output
    line = _error_line(result.stderr)
    assert "CERTIFICATE_VERIFY_FAILED" in line, line
    assert line.endswith("Try: check --ca"), line


# ---- a group replay over MQTT 3.1.1 cannot mark its messages -------------------------------


def test_a_group_replay_over_mqtt_311_is_refused_and_stores_nothing_again(
    broker: Broker, tmp_path: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    """A replay is marked (`mqtt-backup-replay`, an MQTT 5 user property) so that no bridge stores
    it again; MQTT 3.1.1 has no properties. A bridge refuses a replay request on 3.1.1
    (`test_replay_and_raw_need_mqtt5`); the client-side replay of a group must refuse too,
    instead of republishing unmarked copies that the group stores as new messages.
    """
    ns, dirs = two_instances(broker, tmp_path, unique, run_bridge)
    publish(broker, [Sent(f"t{unique}/d1", f"r{i}".encode()) for i in range(10)])
    wait_until(lambda: sum(stored_count(d) for d in dirs) >= 10, 20, "10 stored")
    result = scaleout_restore(broker, ns, "d1", "--replay", "--protocol", "3.1.1")
    publish(broker, [Sent(f"t{unique}/d1", b"barrier")])
    wait_until(lambda: sum(stored_count(d) for d in dirs) >= 11, 20, "the barrier stored")
    assert sum(stored_count(d) for d in dirs) == 11, "the replay was stored again"
    assert result.exit_code == 2, result.output
    line = _error_line(result.stderr)
    assert "MQTT 5" in line, line


def test_a_group_replay_to_bridges_that_read_on_mqtt_311_is_refused_and_stores_nothing_again(
    broker: Broker, tmp_path: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    """The client marks its replay on MQTT 5, but bridges reading on 3.1.1 cannot see the mark.

    They stored every replayed message again as a new one. Their status now says which MQTT
    they read on (`"mqtt"`), and the client refuses before asking anything.
    """
    ns = f"ns{unique}"
    dirs = [tmp_path / "a", tmp_path / "b"]
    for name, data in zip(("a", "b"), dirs, strict=True):
        settings = make_settings(
            broker,
            data,
            namespace=ns,
            group=f"g{unique}",
            instance=name,
            topic=(f"t{unique}/{{device}}",),
            protocol="3.1.1",
        )
        run_bridge(settings)
        online = functools.partial(state_of, broker, ns, name)
        wait_until(lambda: online() == "online", 10, f"{name} online")  # noqa: B023 - now
    publish(broker, [Sent(f"t{unique}/d1", f"r{i}".encode()) for i in range(10)])
    wait_until(lambda: sum(stored_count(d) for d in dirs) >= 10, 20, "10 stored")
    result = scaleout_restore(broker, ns, "d1", "--replay")
    publish(broker, [Sent(f"t{unique}/d1", b"barrier")])
    wait_until(lambda: sum(stored_count(d) for d in dirs) >= 11, 20, "the barrier stored")
    assert sum(stored_count(d) for d in dirs) == 11, "the replay was stored again"
    assert result.exit_code == 2, result.output
    line = _error_line(result.stderr)
    assert "a, b of group" in line, line
    assert "MQTT 3.1.1" in line, line


# ---- a remove on paho while devices publish ---------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_remove_on_paho_while_devices_publish_places_every_message_once(
    broker: Broker,
    data_dir: Path,
    unique: str,
    run_bridge: Callable[..., BridgeThread],
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
) -> None:
    """Devices publish while a remove moves a third of the store, in small units, on paho.

    What arrives is committed between the units (to the old partition until the switch, then
    copied on); afterwards every message is stored once, where placement says, and no copy of
    a moved device is left behind.
    """
    monkeypatch.setattr(units_module, "UNIT_KEYS", 20)
    fill(data_dir, devices=200, per_device=2)
    settings = make_settings(broker, data_dir, protocol=protocol, transport=Transport.PAHO)
    bridge = run_bridge(settings)
    wait_until((data_dir / "control.sock").exists, 20, "the control socket")
    # Devices of the store itself (dev-N, some of them on p2) and new ones.
    topics = [f"devices/dev-{d}/{unique}" for d in range(0, 200, 7)]
    topics += [f"devices/{unique}-{d}/t" for d in range(20)]
    sent = [Sent(topics[i % len(topics)], b"%s %d" % (unique.encode(), i)) for i in range(1500)]
    ledger: list[Sent] = []
    publisher = _publish_in_thread(broker, sent, ledger)
    wait_until(lambda: len(ledger) >= 100, 30, "publishing under way")
    acked = bridge.bridge.snapshot().acknowledged
    answer = call(data_dir, "partitions-remove", {"name": "p2"}, timeout=120)
    assert answer["removed"] == "p2", answer
    assert len(ledger) < len(sent), "the remove ended after the publisher: nothing interleaved"
    assert bridge.bridge.snapshot().acknowledged > acked
    publisher.join(60)
    wait_until(lambda: stored_count(data_dir) >= 400 + len(sent), 30, "every message stored")
    bridge.stop()
    stored = [m for msgs in read_all(data_dir).values() for m in msgs]
    firsts = Counter(m.record.payload for m in stored if unique.encode() in m.record.payload)
    assert set(firsts) == {m.payload for m in sent}
    assert all(n == 1 for n in firsts.values()), "a message stored twice"
    store = Store.open(data_dir, create=False)
    try:
        assert [s.name for s in store.manifest.partitions] == ["p0", "p1"]
        assert moves.rebalance(store, dry_run=True).devices == 0, "a copy left behind"
    finally:
        store.close()
    assert checks.verify(data_dir).ok
