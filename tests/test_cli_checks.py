"""verify and stats from the command line: exit codes and shapes."""

from __future__ import annotations

import json
from pathlib import Path

from rocksdict import Options, Rdict
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.errors import EXIT_STORAGE
from tests.test_partitions import fill

runner = CliRunner()


def test_verify_and_stats_of_a_clean_store(data_dir: Path) -> None:
    fill(data_dir, devices=30)
    verified = runner.invoke(app, ["verify", "--data", str(data_dir), "--json"])
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.output)
    assert (report["ok"], report["devices"], report["records"]) == (True, 30, 120)
    shown = runner.invoke(app, ["stats", "--data", str(data_dir), "--json"])
    assert shown.exit_code == 0, shown.output
    numbers = json.loads(shown.output)
    assert numbers["total"]["messages"] == 120
    assert [p["name"] for p in numbers["partitions"]] == ["p0", "p1", "p2"]
    table = runner.invoke(app, ["stats", "--data", str(data_dir)])
    assert "total" in table.output


def test_a_flipped_byte_fails_verify_with_exit_4(data_dir: Path) -> None:
    fill(data_dir, devices=30)
    families = {"index": Options(raw_mode=True), "meta": Options(raw_mode=True)}
    db = Rdict(str(data_dir / "partitions" / "p1"), Options(raw_mode=True), families)
    try:
        key = next(k for k in db.keys() if isinstance(k, bytes) and len(k) == 28)  # noqa: SIM118 - Rdict is not iterable
        stored = db[key]
        assert isinstance(stored, bytes)
        value = bytearray(stored)
        value[-1] ^= 0x40  # fault injection: one bit of a stored payload
        db[key] = bytes(value)
    finally:
        db.close()
    verified = runner.invoke(app, ["verify", "--data", str(data_dir)])
    assert verified.exit_code == EXIT_STORAGE, verified.output
    assert "PROBLEMS" in verified.output
    assert key.hex()[:16] in verified.output
    assert "checksum" in verified.output
