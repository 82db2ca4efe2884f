"""The bench harness at tiny sizes: it runs and writes well-formed figures (never a speed check)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import report
from bench.__main__ import main, parse_args, variants
from bench.measure import drain, percentile
from bench.procs import PRODUCT_CWD, Bridge, BridgeSpec


def test_drain_fits_a_line_through_the_samples_inside() -> None:
    samples = [(0.0, 1000), (1.0, 1000), (2.0, 800), (3.0, 600), (4.0, 400), (5.0, 0)]
    found = drain(samples, since=0.5, full=1000, base=0)
    assert found.method == "broker-fit"
    assert found.start == pytest.approx(1.0)
    assert found.end == pytest.approx(6.0)
    assert found.rate == pytest.approx(200.0)


def test_short_drain_uses_the_consumers_events() -> None:
    samples = [(0.0, 1000), (2.0, 0)]
    found = drain(samples, since=0.0, full=1000, base=0, events=(0.5, 1.0))
    assert found.method == "consumer-events"
    assert found.rate == pytest.approx(2000.0)


def test_the_bridge_runs_from_a_directory_that_shadows_no_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--bridge-command "env PYTHONPATH=<tree> python -m mqtt_backup"` must run <tree>'s code.

    `python -m` puts the working directory first on `sys.path`: started from the bench's own
    directory (a source tree), the bridge imported that tree instead of the one named.
    """
    shadow = tmp_path / "tree"
    (shadow / "mqtt_backup").mkdir(parents=True)
    (shadow / "mqtt_backup" / "__init__.py").write_text("")
    (shadow / "mqtt_backup" / "__main__.py").write_text("print('the shadowing tree ran')\n")
    monkeypatch.chdir(shadow)
    probe = "import os, sys; print('cwd', os.getcwd())"
    spec = BridgeSpec("probe", [sys.executable, "-c", probe])
    broker = SimpleNamespace(url="mqtt://127.0.0.1:1")
    bridge = Bridge(spec, broker, tmp_path / "data", "probe", tmp_path / "bridge.log")  # type: ignore[arg-type]
    bridge.start()
    assert bridge.proc is not None
    assert bridge.proc.wait(30) == 0
    assert (tmp_path / "bridge.log").read_text().strip() == f"cwd {PRODUCT_CWD}"


def test_relative_paths_in_the_bridge_command_are_the_callers_not_product_cwds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--bridge-command "env PYTHONPATH=other python -P -m mqtt_backup"`, run from its parent.

    The bridge starts from PRODUCT_CWD (/): a relative PYTHONPATH named nothing there, and the
    bridge silently ran the installed tree, an A/B of one tree with itself (hostile review 6).
    """
    other = tmp_path / "other"
    (other / "mqtt_backup").mkdir(parents=True)
    (other / "mqtt_backup" / "__init__.py").write_text("")
    (other / "mqtt_backup" / "__main__.py").write_text("print('the other tree ran')\n")
    monkeypatch.chdir(tmp_path)
    command = f"env PYTHONPATH=other {sys.executable} -P -m mqtt_backup"
    (spec,) = variants(parse_args(["--bridge-command", command]))
    broker = SimpleNamespace(url="mqtt://127.0.0.1:1")
    bridge = Bridge(spec, broker, tmp_path / "data", "probe", tmp_path / "bridge.log")  # type: ignore[arg-type]
    bridge.start()
    assert bridge.proc is not None
    bridge.proc.wait(30)
    assert (tmp_path / "bridge.log").read_text().strip() == "the other tree ran"


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([], 99) == 0.0


def _well_formed(row: dict[str, object]) -> None:
    value = row["value"]
    assert isinstance(value, float | int)
    assert math.isfinite(value)
    assert value > 0, row
    assert row["unit"] != "failed", row
    ratio = row["ratio"]
    if row["reference"] is not None:
        assert isinstance(ratio, float)
        assert math.isfinite(ratio)
        assert ratio > 0


@pytest.mark.slow  # every scenario end to end, with its fixed warm-up and measuring windows
def test_tiny_run_writes_json_and_the_page(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--factor", "0.002", "--json", str(out), "--docs", str(tmp_path), "--no-docs"]
    for scenario in ("storage", "ingest", "restore", "devices", "live", "web"):
        args += ["--only", scenario]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["cores"] >= 1
    assert doc["machine"]["mosquitto"] not in ("", "unknown")
    scenarios = {row["scenario"] for row in doc["rows"]}
    assert scenarios == {"storage", "ingest", "restore", "devices", "live ingest", "web"}
    for row in doc["rows"]:
        _well_formed(row)
    (tmp_path / "benchmarks.json").write_text(out.read_text())
    page = report.write_markdown(tmp_path).read_text()
    assert "| ingest |" in page
    assert "| web |" in page
    assert "Not run yet" in page  # no BENCH_SCALE file beside it
