"""The typed results of maintenance: `as_json()` is exactly the JSON of earlier releases.

Users' scripts read `prune --json`, `forget --json`, `snapshot --json` and the partition commands'
documents (and the control socket carries them), so the expected documents below were taken from
the dict-returning implementation before the results were typed: keys, their order and values.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mqtt_backup import operations
from mqtt_backup.cli import app
from mqtt_backup.storage import Store, maintenance, moves
from mqtt_backup.times import NS_PER_S
from tests.test_operations import T0, fill

runner = CliRunner()
NOW = T0 + 3 * 60 * NS_PER_S
TWO_MINUTES = 2 * 60 * NS_PER_S

PRUNE_DRY: dict[str, Any] = {
    "dry_run": True,
    "cutoff": "2023-11-14T22:14:20.000000000Z",
    "messages": 3,
    "bytes": 207,
    "devices": [
        {"device": "dev-0", "messages": 1, "bytes": 69},
        {"device": "dev-1", "messages": 1, "bytes": 69},
        {"device": "dev-2", "messages": 1, "bytes": 69},
    ],
}
PRUNE_BY_SIZE: dict[str, Any] = {
    "dry_run": True,
    "cutoff": None,
    "messages": 6,
    "bytes": 414,
    "devices": [
        {"device": "dev-0", "messages": 2, "bytes": 138},
        {"device": "dev-1", "messages": 2, "bytes": 138},
        {"device": "dev-2", "messages": 2, "bytes": 138},
    ],
}
FORGET_BEFORE_DRY: dict[str, Any] = {
    "dry_run": True,
    "before": "2023-11-14T22:15:20.000000000Z",
    "device": "dev-1",
    "messages": 2,
    "bytes": 138,
}
FORGET_NOBODY: dict[str, Any] = {
    "dry_run": False,
    "before": None,
    "device": "nobody",
    "messages": 0,
    "bytes": 0,
}
ADD_DRY: dict[str, Any] = {
    "added": "p3",
    "dry_run": True,
    "devices": 2,
    "messages": 8,
    "bytes": 552,
    "moves": [
        {"device": "dev-0", "from": "p2", "to": "p3", "messages": 4, "bytes": 276},
        {"device": "dev-2", "from": "p1", "to": "p3", "messages": 4, "bytes": 276},
    ],
}
REMOVE_DRY: dict[str, Any] = {
    "removed": "p0",
    "dry_run": True,
    "devices": 1,
    "messages": 4,
    "bytes": 276,
    "moves": [{"device": "dev-1", "from": "p0", "to": "p2", "messages": 4, "bytes": 276}],
}
REBALANCE_DRY: dict[str, Any] = {
    "dry_run": True,
    "devices": 0,
    "messages": 0,
    "bytes": 0,
    "moves": [],
}
SNAPSHOT: dict[str, Any] = {"snapshot": "<DEST>", "partitions": ["p0", "p1", "p2"]}
FORGET: dict[str, Any] = {
    "dry_run": False,
    "before": None,
    "device": "dev-2",
    "messages": 4,
    "bytes": 276,
}
PRUNE: dict[str, Any] = {
    "dry_run": False,
    "cutoff": "2023-11-14T22:14:20.000000000Z",
    "messages": 2,
    "bytes": 138,
    "devices": [
        {"device": "dev-0", "messages": 1, "bytes": 69},
        {"device": "dev-1", "messages": 1, "bytes": 69},
    ],
}
ADD: dict[str, Any] = {
    "added": "p3",
    "dry_run": False,
    "devices": 1,
    "messages": 3,
    "bytes": 207,
    "moves": [{"device": "dev-0", "from": "p2", "to": "p3", "messages": 3, "bytes": 207}],
}
REMOVE: dict[str, Any] = {
    "removed": "p0",
    "dry_run": False,
    "devices": 1,
    "messages": 3,
    "bytes": 207,
    "moves": [{"device": "dev-1", "from": "p0", "to": "p2", "messages": 3, "bytes": 207}],
}


def same(result: dict[str, Any], expected: dict[str, Any]) -> None:
    """Equal, and with the keys in the same order (the text `--json` prints)."""
    assert json.dumps(result) == json.dumps(expected)


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    fill(data_dir, devices=3, per_device=4)
    store = Store.open(data_dir, create=False)
    yield store
    store.close()


def test_every_result_prints_the_documents_of_earlier_releases(
    store: Store, tmp_path: Path
) -> None:
    same(maintenance.prune(store, TWO_MINUTES, dry_run=True, now_ns=NOW).as_json(), PRUNE_DRY)
    same(maintenance.prune(store, max_bytes_per_device=200, dry_run=True).as_json(), PRUNE_BY_SIZE)
    before = T0 + TWO_MINUTES
    same(
        maintenance.forget(store, "dev-1", before_ns=before, dry_run=True).as_json(),
        FORGET_BEFORE_DRY,
    )
    same(maintenance.forget(store, "nobody").as_json(), FORGET_NOBODY)
    same(moves.add(store, "p3", dry_run=True).as_json(), ADD_DRY)
    same(moves.remove(store, "p0", dry_run=True).as_json(), REMOVE_DRY)
    same(moves.rebalance(store, dry_run=True).as_json(), REBALANCE_DRY)
    dest = tmp_path / "copy"
    same(maintenance.snapshot(store, dest).as_json(), {**SNAPSHOT, "snapshot": str(dest)})
    same(maintenance.forget(store, "dev-2").as_json(), FORGET)
    same(maintenance.prune(store, TWO_MINUTES, now_ns=NOW).as_json(), PRUNE)
    same(moves.add(store, "p3").as_json(), ADD)
    same(moves.remove(store, "p0").as_json(), REMOVE)


def test_the_typed_fields_say_what_the_documents_say(store: Store) -> None:
    pruned = maintenance.prune(store, TWO_MINUTES, dry_run=True, now_ns=NOW)
    assert (pruned.messages, pruned.size, pruned.cutoff_ns) == (3, 207, NOW - TWO_MINUTES)
    assert [d.device for d in pruned.devices] == ["dev-0", "dev-1", "dev-2"]
    added = moves.add(store, "p3", dry_run=True)
    assert (added.name, added.moves.devices, added.moves.messages, added.moves.size) == (
        "p3",
        2,
        8,
        552,
    )
    assert [(m.device, m.source, m.target) for m in added.moves.moves] == [
        ("dev-0", "p2", "p3"),
        ("dev-2", "p1", "p3"),
    ]
    forgotten = maintenance.forget(store, "dev-1", dry_run=True)
    assert (forgotten.removed.device, forgotten.removed.messages) == ("dev-1", 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        forgotten.dry_run = False  # type: ignore[misc]


def test_the_socket_dispatcher_sends_the_same_documents(store: Store) -> None:
    args = {"max_bytes_per_device": 200, "dry_run": True}
    same(operations.run(store, "prune", args), PRUNE_BY_SIZE)
    same(operations.run(store, "partitions-add", {"name": "p3", "dry_run": True}), ADD_DRY)
    same(operations.run(store, "rebalance", {"dry_run": True}), REBALANCE_DRY)
    same(operations.run(store, "forget", {"device": "nobody"}), FORGET_NOBODY)


def test_the_cli_prints_the_same_documents(store: Store, data_dir: Path) -> None:
    store.close()  # the command opens the directory itself
    dry = runner.invoke(
        app, ["partitions", "add", "p3", "--dry-run", "--json", "--data", str(data_dir)]
    )
    assert dry.exit_code == 0, dry.output
    # The CLI adds where the partition goes, absolute (`partitions add --path` resolves it).
    printed = json.loads(dry.stdout)
    assert printed.pop("path") == str((data_dir / "partitions" / "p3").resolve())
    same(printed, ADD_DRY)
    gone = runner.invoke(app, ["forget", "dev-2", "--json", "--data", str(data_dir)])
    assert gone.exit_code == 0, gone.output
    same(json.loads(gone.stdout), FORGET)
