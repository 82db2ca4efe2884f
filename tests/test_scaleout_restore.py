"""Gathered restores on a real Mosquitto: two instances of a group, a silent one, two groups."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import click.testing
import pytest
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.errors import EXIT_RUNTIME, EXIT_USAGE
from mqtt_backup.restore.request import BadRequest, parse_request
from mqtt_backup.status import STATUS_PROTOCOL
from mqtt_backup.storage.journal import Gap, GapLog
from tests.conftest import (
    BridgeThread,
    Broker,
    Sent,
    device_client,
    make_settings,
    publish,
    stored_count,
    wait_until,
)
from tests.test_status import state_of


def restore(broker: Broker, ns: str, device: str, *args: str) -> click.testing.Result:
    """`mqtt-backup restore` in this process."""
    argv = ["restore", device, "--broker", broker.url, "--namespace", ns, *args]
    return CliRunner().invoke(app, argv)


def announce(broker: Broker, ns: str, group: str, name: str) -> None:
    """A retained `online` status of a bridge that will never answer."""
    body = {"state": "online", "protocol": STATUS_PROTOCOL, "group": group, "instance": name}

    async def send() -> None:
        async with device_client(broker) as client:
            topic = f"{ns}/status/{group}/{name}"
            await client.publish(topic, json.dumps(body).encode(), qos=1, retain=True)

    asyncio.run(send())


def two_instances(
    broker: Broker, root: Path, unique: str, start: Callable[..., BridgeThread]
) -> tuple[str, list[Path]]:
    """Instances a and b of group g<unique>, online; (namespace, their data dirs)."""
    ns = f"ns{unique}"
    dirs = [root / "a", root / "b"]
    for name, data in zip(("a", "b"), dirs, strict=True):
        start(
            make_settings(
                broker,
                data,
                namespace=ns,
                group=f"g{unique}",
                instance=name,
                topic=(f"t{unique}/{{device}}",),
            )
        )
        wait_until(functools.partial(_online, broker, ns, name), 10, f"{name} online")
    return ns, dirs


def _online(broker: Broker, ns: str, name: str) -> bool:
    return state_of(broker, ns, name) == "online"


def test_the_group_field_round_trips_and_is_checked() -> None:
    assert parse_request("d", b'{"group": "fleet"}').group == "fleet"
    assert parse_request("d", b'{"group": "fleet"}').payload() == b'{"group": "fleet"}'
    with pytest.raises(BadRequest, match="'group' must be a group name"):
        parse_request("d", b'{"group": "a/b"}')


def test_two_instances_merge_by_receive_time_and_limit_applies_after_the_merge(
    broker: Broker, tmp_path: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    ns, dirs = two_instances(broker, tmp_path, unique, run_bridge)
    publish(broker, [Sent(f"t{unique}/d1", f"m{i}".encode()) for i in range(40)])
    wait_until(lambda: sum(stored_count(d) for d in dirs) >= 40, 20, "40 stored")
    assert all(stored_count(d) > 0 for d in dirs), "the broker shared the messages"

    everything = restore(broker, ns, "d1")
    assert everything.exit_code == 0, everything.output
    lines = [json.loads(line) for line in everything.stdout.splitlines()]
    # Receive time, not publish order: each instance stamps its own share, so two messages a
    # millisecond apart may swap when two instances took them (docs/scale-out.md).
    assert [m["ts"] for m in lines] == sorted(m["ts"] for m in lines)
    assert sorted(m["payload"] for m in lines) == sorted(f"m{i}" for i in range(40))
    assert all("instance" not in m and "seq" not in m for m in lines)  # export's lines
    assert "restored 40 messages of d1 from 2 instances (a, b) (complete)" in everything.stderr

    newest = restore(broker, ns, "d1", "--limit", "3", "--desc")
    assert newest.exit_code == 0, newest.output
    assert [json.loads(line) for line in newest.stdout.splitlines()] == lines[::-1][:3]


def test_a_silent_member_makes_the_restore_incomplete(
    broker: Broker, tmp_path: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    ns, dirs = two_instances(broker, tmp_path, unique, run_bridge)
    announce(broker, ns, f"g{unique}", "ghost")
    publish(broker, [Sent(f"t{unique}/d2", f"m{i}".encode()) for i in range(6)])
    wait_until(lambda: sum(stored_count(d) for d in dirs) >= 6, 20, "6 stored")
    result = restore(broker, ns, "d2", "--timeout", "2")
    assert result.exit_code == EXIT_RUNTIME, result.output
    assert len(result.stdout.splitlines()) == 6, result.output  # what arrived is written
    assert result.stderr.strip() == (
        "mqtt-backup: the restore is incomplete: restored 6 messages of d2 from 2 instances "
        "(a, b), but ghost sent no terminal in time (what arrived is written). Try: look at "
        "that instance's log (mqtt-backup status shows whether it is online), or raise --timeout"
    )


def test_several_groups_online_need_a_group(broker: Broker, unique: str) -> None:
    ns = f"ns{unique}"
    announce(broker, ns, "east", "e1")
    announce(broker, ns, "west", "w1")
    result = restore(broker, ns, "d3", "--timeout", "1")
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.stderr.strip() == (
        "mqtt-backup: bridges of 2 groups are online (east, west); each group holds a full "
        "copy. Try: choose one: --group east or --group west"
    )


def test_a_replay_in_a_group_gathers_first_and_republishes_in_order(
    broker: Broker, tmp_path: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    ns, dirs = two_instances(broker, tmp_path, unique, run_bridge)
    sent = [Sent(f"t{unique}/d1", f"r{i}".encode()) for i in range(20)]
    publish(broker, sent)
    wait_until(lambda: sum(stored_count(d) for d in dirs) >= 20, 20, "20 stored")
    assert all(stored_count(d) > 0 for d in dirs), "the broker shared the messages"
    exported = restore(broker, ns, "d1")
    assert exported.exit_code == 0, exported.output
    in_order = [json.loads(line)["payload"] for line in exported.stdout.splitlines()]

    async def replay_and_listen() -> tuple[click.testing.Result, list[tuple[str, bool]]]:
        heard: list[tuple[str, bool]] = []
        async with device_client(broker) as listener:
            await listener.subscribe(f"t{unique}/d1", qos=1)
            result = await asyncio.to_thread(restore, broker, ns, "d1", "--replay")
            async with asyncio.timeout(20):
                async for message in listener.messages:
                    assert isinstance(message.payload, bytes)
                    props = message.properties
                    user = (
                        dict(props.UserProperty) if props and hasattr(props, "UserProperty") else {}
                    )
                    heard.append((message.payload.decode(), "mqtt-backup-replay" in user))
                    if len(heard) == len(in_order):
                        break
        return result, heard

    result, heard = asyncio.run(replay_and_listen())
    assert result.exit_code == 0, result.output
    assert "replayed 20 messages of d1 from 2 instances (a, b)" in result.stderr
    # One stream, in the merged order (receive time across both instances), each marked.
    assert [payload for payload, _ in heard] == in_order
    assert all(marked for _, marked in heard)
    # Marked replays are not stored again by either instance.
    publish(broker, [Sent(f"t{unique}/d1", b"barrier")])
    wait_until(lambda: sum(stored_count(d) for d in dirs) >= 21, 20, "the barrier stored")
    assert sum(stored_count(d) for d in dirs) == 21
    # A gap one instance recorded is told after a replay too (the summary said nothing of it).
    now = time.time_ns()
    GapLog(dirs[1]).record(Gap(now - 3600 * 10**9, now, "session-lost"))
    again = restore(broker, ns, "d1", "--replay")
    assert again.exit_code == 0, again.output
    assert "replayed 21 messages of d1 from 2 instances (a, b) (INCOMPLETE: may have missed" in (
        again.stderr
    )
    assert "(session-lost)" in again.stderr
