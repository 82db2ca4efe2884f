"""`mqtt-backup status` shows which MQTT each bridge reads on, in the table as in `--json`.

The `mqtt` field came with the refusal of a group replay to 3.1.1 readers, but only `--json`
showed it: the table gave no hint why a replay was refused.
"""

from __future__ import annotations

import asyncio
import json

from mqtt_backup.status import STATUS_PROTOCOL
from tests.conftest import Broker, device_client
from tests.test_status import status


def _announce(broker: Broker, ns: str, name: str, mqtt: str | None) -> None:
    body: dict[str, object] = {"state": "online", "protocol": STATUS_PROTOCOL, "instance": name}
    if mqtt is not None:
        body["mqtt"] = mqtt

    async def send() -> None:
        async with device_client(broker) as client:
            topic = f"{ns}/status/fleet/{name}"
            await client.publish(topic, json.dumps(body).encode(), qos=1, retain=True)

    asyncio.run(send())


def test_the_status_table_has_an_mqtt_column(broker: Broker, unique: str) -> None:
    ns = f"ns{unique}"
    _announce(broker, ns, "b1", "5")
    _announce(broker, ns, "b2", "3.1.1")
    _announce(broker, ns, "b3", None)  # a bridge from before the field: it says nothing
    result = status(broker, ns, "--wait", "0.5")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "instance" in line)
    assert " mqtt " in header, result.stdout
    rows = {
        line.split("│")[2].strip(): [cell.strip() for cell in line.split("│")]
        for line in result.stdout.splitlines()
        if line.startswith("│")
    }
    column = [cell.strip() for cell in header.split("┃")].index("mqtt")
    assert {name: row[column] for name, row in rows.items()} == {
        "b1": "5",
        "b2": "3.1.1",
        "b3": "-",
    }
