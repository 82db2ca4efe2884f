"""A partition dry run on a big fleet shows a bounded table; `--json` still lists every move.

It printed one row per device that would move: 497 rows for a 5,000-device simulation, a
quarter of any fleet, before anything was asked.
"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.cli.maintenance import DRY_RUN_ROWS
from tests.test_partitions import fill


def _dry_run(args: list[str], key: str) -> tuple[list[dict[str, object]], Result]:
    """The dry run's rows under `key` from `--json`, and the table run (exit 0 checked)."""
    rows = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)[key]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return rows, result


def _shows_a_page(rows: list[dict[str, object]], result: Result) -> None:
    """The table lists the first page of rows, in order, then says how many more there are."""
    listed = [r["device"] for r in rows if f" {r['device']} " in result.stdout]
    assert listed == [r["device"] for r in rows[:DRY_RUN_ROWS]]
    assert result.stdout.rstrip().endswith(
        f"... and {len(rows) - DRY_RUN_ROWS} more devices (--json lists every one)"
    )


def test_a_dry_run_shows_at_most_a_page_of_moves_and_says_how_many_more(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fill(data, devices=400, per_device=1)
    args = ["partitions", "add", "p3", "--data", str(data), "--dry-run"]
    moves, result = _dry_run(args, "moves")
    assert len(moves) > DRY_RUN_ROWS
    _shows_a_page(moves, result)


def test_a_small_dry_run_lists_every_move(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fill(data, devices=12, per_device=1)
    args = ["partitions", "add", "p3", "--data", str(data), "--dry-run"]
    moves, result = _dry_run(args, "moves")
    assert moves
    assert all(f" {m['device']} " in result.stdout for m in moves)
    assert "more devices" not in result.stdout


def test_a_prune_shows_at_most_a_page_of_devices_and_says_how_many_more(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fill(data, devices=120, per_device=1)
    args = ["prune", "--older-than", "1s", "--data", str(data), "--dry-run"]
    devices, result = _dry_run(args, "devices")
    assert len(devices) == 120
    _shows_a_page(devices, result)
