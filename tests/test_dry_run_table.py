"""A partition dry run on a big fleet shows a bounded table; `--json` still lists every move.

It printed one row per device that would move: 497 rows for a 5,000-device simulation, a
quarter of any fleet, before anything was asked.
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.cli.maintenance import DRY_RUN_ROWS
from tests.test_partitions import fill


def test_a_dry_run_shows_at_most_a_page_of_moves_and_says_how_many_more(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fill(data, devices=400, per_device=1)
    args = ["partitions", "add", "p3", "--data", str(data), "--dry-run"]
    moves = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)["moves"]
    assert len(moves) > DRY_RUN_ROWS
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    listed = [m["device"] for m in moves if f" {m['device']} " in result.stdout]
    assert listed == [m["device"] for m in moves[:DRY_RUN_ROWS]]
    assert result.stdout.rstrip().endswith(
        f"... and {len(moves) - DRY_RUN_ROWS} more devices (--json lists every one)"
    )


def test_a_small_dry_run_lists_every_move(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fill(data, devices=12, per_device=1)
    args = ["partitions", "add", "p3", "--data", str(data), "--dry-run"]
    moves = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)["moves"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert moves
    assert all(f" {m['device']} " in result.stdout for m in moves)
    assert "more devices" not in result.stdout


def test_a_prune_shows_at_most_a_page_of_devices_and_says_how_many_more(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fill(data, devices=120, per_device=1)
    args = ["prune", "--older-than", "1s", "--data", str(data), "--dry-run"]
    devices = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)["devices"]
    assert len(devices) == 120
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    listed = [d["device"] for d in devices if f" {d['device']} " in result.stdout]
    assert listed == [d["device"] for d in devices[:DRY_RUN_ROWS]]
    assert result.stdout.rstrip().endswith(
        f"... and {120 - DRY_RUN_ROWS} more devices (--json lists every one)"
    )
