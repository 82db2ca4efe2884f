"""`restore --group default` beside a grouped bridge asks the ungrouped bridge only.

With a lone ungrouped bridge online the client used to ask the one-answer way, without the
group in the request: every bridge of every group answered it, so the output mixed copies from
the other group (and a `--replay` made the other group's bridges republish their part).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mqtt_backup.cli.restore import _can_replay
from mqtt_backup.config import BrokerTarget, parse_broker_url
from mqtt_backup.errors import UsageError
from mqtt_backup.restore.client import Ask
from mqtt_backup.restore.request import Request
from mqtt_backup.status import STATUS_PROTOCOL, Member
from tests.conftest import (
    BridgeThread,
    Broker,
    Sent,
    make_settings,
    publish,
    stored_count,
    wait_until,
)
from tests.test_scaleout_restore import _online, restore


def test_group_default_is_only_the_ungrouped_bridge_beside_another_group(
    broker: Broker, tmp_path: Path, unique: str, run_bridge: Callable[..., BridgeThread]
) -> None:
    ns = f"ns{unique}"
    plain, grouped = tmp_path / "plain", tmp_path / "grouped"
    # Each keeps its own topic, so whose copy a line is shows in its topic.
    run_bridge(
        make_settings(
            broker,
            plain,
            namespace=ns,
            client_id=f"plain{unique}",
            topic=(f"t{unique}/{{device}}",),
        )
    )
    run_bridge(
        make_settings(
            broker,
            grouped,
            namespace=ns,
            group=f"g{unique}",
            instance="a",
            topic=(f"u{unique}/{{device}}",),
        )
    )
    for name in (f"plain{unique}", "a"):
        wait_until(functools.partial(_online, broker, ns, name), 10, f"{name} online")
    publish(broker, [Sent(f"t{unique}/d1", f"p{i}".encode()) for i in range(2)])
    publish(broker, [Sent(f"u{unique}/d1", f"g{i}".encode()) for i in range(3)])
    wait_until(lambda: (stored_count(plain), stored_count(grouped)) == (2, 3), 20, "all stored")

    result = restore(broker, ns, "d1", "--group", "default")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [m["payload"] for m in lines] == ["p0", "p1"]
    assert f"restored 2 messages of d1 from 1 instance (plain{unique}) (complete)" in (
        result.stderr
    )

    grouped_only = restore(broker, ns, "d1", "--group", f"g{unique}")
    assert grouped_only.exit_code == 0, grouped_only.output
    assert [json.loads(line)["payload"] for line in grouped_only.stdout.splitlines()] == [
        "g0",
        "g1",
        "g2",
    ]


def _member(name: str, mqtt: str) -> Member:
    body = {"state": "online", "protocol": STATUS_PROTOCOL, "mqtt": mqtt}
    return Member(topic=f"backup/status/fleet/{name}", group="fleet", name=name, body=body)


def test_the_replay_refusal_reads_right_for_one_member_and_for_several() -> None:
    ask = Ask(target=BrokerTarget(parse_broker_url("mqtt://127.0.0.1:1883")), request=Request("d"))
    with pytest.raises(UsageError) as one:
        _can_replay(ask, [_member("b1", "5"), _member("b2", "3.1.1")])
    assert str(one.value).startswith(
        "b2 of group fleet reads on MQTT 3.1.1, where the replay mark cannot be seen: it would "
        "store the replay again"
    )
    with pytest.raises(UsageError) as two:
        _can_replay(ask, [_member("b1", "3.1.1"), _member("b2", "3.1.1")])
    assert str(two.value).startswith(
        "b1, b2 of group fleet read on MQTT 3.1.1, where the replay mark cannot be seen: they "
        "would store the replay again"
    )
