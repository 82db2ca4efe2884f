"""Second hostile review of issue 8's fixes: what a hostile or unlucky user can still do.

Each test reproduces one defect found by attacking a running bridge on a real Mosquitto, and now
passes (each was seen failing before its fix).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from mqtt_backup import control
from mqtt_backup.config import BrokerTarget, parse_broker_url
from mqtt_backup.errors import BackupError
from mqtt_backup.restore.client import Ask, NoAnswer, ask, request_for
from mqtt_backup.storage import StoreReader
from tests.conftest import BridgeThread, Broker, make_settings, wait_until
from tests.faults.conftest import BrokerFactory
from tests.faults.harness import (
    RATE,
    Publisher,
    ReadBack,
    assert_nothing_lost,
    bridge_process,
    cli,
    copies_of,
    fleet,
    restored,
    tally,
)
from tests.faults.test_real_disk_full import _count_all, _exported, _fill, small_disk

RunBridge = Callable[..., BridgeThread]

LIMIT = 100_000  # the broker's max_packet_size in these tests


async def _publish(port: int, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


def _count(data: Path, device: str) -> int:
    """Messages of `device` the index says are stored (read in this process, as polls are)."""
    try:
        with StoreReader(data) as reader:
            info = reader.device(device)
    except Exception:  # noqa: BLE001 - not created yet
        return 0
    return info.count if info is not None else 0


def _ask(url: str, device: str, fields: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """The terminal of one restore, or {"no answer": reason} when none came."""
    question = Ask(
        BrokerTarget(parse_broker_url(url)), request_for(device, fields), timeout=timeout
    )
    try:
        return asyncio.run(ask(question, lambda _line: None))
    except NoAnswer as exc:
        return {"no answer": exc.message()}


def _reconnects(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage()[:200] for r in caplog.records if "retrying" in r.getMessage()]


def test_oversized_answer_on_a_311_bridge_ends_with_an_error_terminal(
    make_broker: BrokerFactory,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 76,000-byte binary payload fits the broker; its base64 JSON answer (~101 kB) does not.

    A 3.1.1 CONNACK does not announce the broker's limit: `--max-packet-size` says it (without
    it, the broker drops the restore connection and the requester times out).
    """
    caplog.set_level(logging.WARNING, logger="mqtt_backup.restore")
    broker = make_broker(f"max_packet_size {LIMIT}")
    bridge = run_bridge(make_settings(broker, data_dir, protocol="3.1.1", max_packet_size=LIMIT))
    wait_until(bridge.bridge.restore_listening.is_set, 30, "the restore service")
    device = f"{unique}-big"
    topic = f"devices/{device}/t"
    big = bytes(range(256)) * (76_000 // 256)
    asyncio.run(_publish(broker.port, [(topic, b"before"), (topic, big), (topic, b"after")]))
    wait_until(lambda: _count(data_dir, device) == 3, 30, "the three messages")
    end = _ask(broker.url, device, {})
    bridge.stop()
    assert "error" in end, end
    assert end.get("id"), "the error terminal carries the request's id"
    assert "maximum packet size" in end["error"]
    assert _reconnects(caplog) == [], "the restore connection must not drop"


def test_oversized_replay_error_terminal_itself_fits_and_names_the_stored_topic(
    make_broker: BrokerFactory,
    data_dir: Path,
    unique: str,
    run_bridge: RunBridge,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A replay that meets a message at the broker's limit whose topic escapes to 4x its size.

    The error quoted the whole topic (repr, then JSON: 40,000 backslashes became 160,000 bytes),
    so the error terminal was itself too large: the broker dropped the restore connection and
    the requester timed out. The JSON and raw errors also named the response topic as the
    stored message's topic.
    """
    caplog.set_level(logging.WARNING, logger="mqtt_backup.restore")
    broker = make_broker(f"max_packet_size {LIMIT}")
    bridge = run_bridge(make_settings(broker, data_dir))
    wait_until(bridge.bridge.restore_listening.is_set, 30, "the restore service")
    device = f"{unique}-bs"
    topic = f"devices/{device}/" + "\\" * 40_000
    # Mosquitto counts remaining length + 1 against max_packet_size; the MQTT 5 PUBLISH has a
    # packet id and a properties length byte: this payload fills it to the broker's limit.
    payload = b"\x00" * (LIMIT - 1 - (2 + len(topic.encode()) + 2 + 1))
    asyncio.run(_publish(broker.port, [(f"devices/{device}/a", b"first"), (topic, payload)]))
    wait_until(lambda: _count(data_dir, device) == 2, 30, "both messages")
    replay = _ask(broker.url, device, {"mode": "replay"})
    as_json = _ask(broker.url, device, {})
    bridge.stop()
    assert "error" in replay, replay
    assert "maximum packet size" in replay["error"]
    assert len(json.dumps(replay)) < 1000, "the error is one readable line, not the whole topic"
    assert "error" in as_json, as_json
    assert f"devices/{device}/" in as_json["error"], "names the stored message's topic"
    assert "backup/restore" not in as_json["error"], "not the response topic"
    assert _reconnects(caplog) == [], "the restore connection must not drop"


# ---- a full disk through a running bridge -------------------------------------------------------


@pytest.mark.slow
def test_a_prune_that_deletes_nothing_keeps_the_reserve_for_the_next_one(
    own_broker: Broker, tmp_path: Path, unique: str
) -> None:
    """Full disk, ingest stalled: `prune --older-than 30d` (nothing that old), then `forget`."""
    mount = tmp_path / "disk"
    data = mount / "data"
    with (
        small_disk(mount) as inside,
        bridge_process(own_broker.url, data, tmp_path / "bridge.log", prefix=inside) as bridge,
    ):
        bridge.start()
        old = f"{unique}-old"
        # Incompressible, so that forgetting it gives real room back (about 10 MB).
        history = [(f"devices/{old}/t", random.randbytes(64 * 1024)) for _ in range(150)]
        asyncio.run(_publish(own_broker.port, history))
        wait_until(lambda: _count_on(data, inside, old) == len(history), 60, "the old history")
        # Big enough messages that a stalled bridge refills a released ballast in seconds.
        publisher = Publisher(own_broker.port, fleet(unique, 4), rate=RATE, pad=16 * 1024)
        publisher.start().wait_accepted(100)
        _fill(inside, mount / "filler")
        wait_until(lambda: "storage failed" in bridge.text(), 60, "the bridge to hit ENOSPC")

        nothing = cli("prune", "--older-than", "30d", "--data", str(data), "--json", prefix=inside)
        assert nothing.returncode == 0, nothing.stderr
        assert json.loads(nothing.stdout)["messages"] == 0
        # The prune freed nothing: the room its ballast release gave is the reserve again, not
        # room for stalled ingest to fill (before the fix, ingest took it and stalled again).
        kept = subprocess.run([*inside, "test", "-s", str(data / "ballast")], check=False)
        assert kept.returncode == 0, "the ballast was not kept after a prune that freed nothing"
        assert "ballast for the next one" in bridge.text()
        # A failed flush deletes its partial file; another program takes that room too.
        _fill(inside, mount / "filler2")

        freed = cli("forget", old, "--data", str(data), "--json", prefix=inside)
        assert freed.returncode == 0, f"forget could not free the full disk: {freed.stderr}"
        subprocess.run([*inside, "rm", str(mount / "filler"), str(mount / "filler2")], check=True)
        publisher.wait_accepted(300)
        ledger = publisher.stop()
        wait_until(
            lambda: _count_all(data, inside, list(ledger.accepted)) >= ledger.total, 120, "all"
        )
        got = restored(own_broker.url, list(ledger.accepted))
        back = ReadBack(
            tally(ledger, copies_of(_exported(data, inside))), tally(ledger, got.copies), got
        )
    assert_nothing_lost(back)


def _count_on(data: Path, prefix: list[str], device: str) -> int:
    return _count_all(data, prefix, [device])


def test_an_operation_whose_bridge_dies_says_so(tmp_path: Path) -> None:
    """A bridge killed during `forget` closes the control socket without a reply.

    The CLI printed "mqtt-backup: no answer" (exit 1): neither what happened nor what to do.
    A listening socket that closes each connection after reading the request stands in for it
    (kill -9 of a real bridge mid-operation does the same, at a moment a test cannot choose).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(tmp_path / control.SOCKET))
        server.listen(1)

        def close_after_request() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)

        dying = threading.Thread(target=close_after_request, daemon=True)
        dying.start()
        with pytest.raises(BackupError) as caught:
            control.call(tmp_path, "forget", {"device": "dev-1"}, timeout=30)
        dying.join(10)
    message = caught.value.message()
    assert "went away before it answered" in message
    assert "forget" in message
    assert "Try:" in message
    assert caught.value.exit_code == 1
