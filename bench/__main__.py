"""`python -m bench` (`make bench`): run the scenarios, print a table, write the JSON and the docs.

python -m bench                         # the default run (under 5 minutes on a quiet machine)
BENCH_SCALE=1 python -m bench           # the big goals: its own JSON and section
python -m bench --variant paho:'--transport paho' --variant asyncio:'--transport asyncio'
python -m bench --only ingest --factor 0.1
python -m bench docs                    # regenerate docs/benchmarks.md from the JSON files
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import machine, report, scenarios, web
from bench.procs import (
    BenchError,
    BridgeSpec,
    default_bridge_command,
    reap_subscribers,
    with_absolute_paths,
)
from tools.devbroker import BrokerStartError

DOCS = Path(__file__).resolve().parent.parent / "docs"

SCENARIOS: dict[str, Callable[[scenarios.Context], list[scenarios.Row]]] = {
    "storage": scenarios.storage,
    "ingest": lambda ctx: scenarios.ingest(ctx, "stock"),
    "ingest-dev": lambda ctx: scenarios.ingest(ctx, "dev.conf"),
    "restore": scenarios.restore,
    "devices": scenarios.devices,
    "live": scenarios.live,
    "operations": scenarios.operations,
    "busy": scenarios.busy_ingest,
    "web": web.scenario,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; environment variables give the defaults make passes through."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("command", nargs="?", choices=["run", "docs"], default="run")
    parser.add_argument(
        "--scale",
        action="store_true",
        default=os.environ.get("BENCH_SCALE", "") not in ("", "0"),
        help="the big goals (1M messages, 1M devices, 10 minutes) [env BENCH_SCALE=1]",
    )
    parser.add_argument("--factor", type=float, default=1.0, help="multiply every size (smoke)")
    parser.add_argument("--only", action="append", choices=list(SCENARIOS), help="repeatable")
    parser.add_argument(
        "--variant",
        action="append",
        help="NAME[:EXTRA RUN ARGS], e.g. asyncio:'--transport asyncio'; repeatable "
        "[env BENCH_VARIANTS, ';'-separated]",
    )
    parser.add_argument(
        "--bridge-command",
        default=os.environ.get("BENCH_BRIDGE", ""),
        help="the command before `run` [env BENCH_BRIDGE; default: this python -m mqtt_backup]",
    )
    parser.add_argument("--json", type=Path, help="where the JSON goes [default: docs/...]")
    parser.add_argument("--docs", type=Path, default=DOCS, help="directory of benchmarks.md")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite benchmarks.md")
    parser.add_argument("--work", type=Path, help="scratch directory (kept) [default: a temp dir]")
    return parser.parse_args(argv)


def variants(args: argparse.Namespace) -> list[BridgeSpec]:
    """The bridge variants of this run."""
    # The bridge runs from PRODUCT_CWD: relative paths are made the caller's first.
    command = with_absolute_paths(shlex.split(args.bridge_command)) or default_bridge_command()
    texts = args.variant or [v for v in os.environ.get("BENCH_VARIANTS", "").split(";") if v]
    return [BridgeSpec.parse(t, command) for t in texts or ["default"]]


def _one(name: str, ctx: scenarios.Context, console: Console) -> list[scenarios.Row]:
    """One scenario's rows; a failure is a row that says why, and the run goes on."""
    try:
        return SCENARIOS[name](ctx)
    except (BenchError, BrokerStartError, OSError, subprocess.SubprocessError) as exc:
        console.log(f"{name} failed: {exc}")
        return [scenarios.Row(name, "failed", "-", 0.0, "failed", details={"error": str(exc)})]
    finally:
        reap_subscribers()


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Every chosen scenario in turn; the document the JSON file holds."""
    sizes = (scenarios.SCALE if args.scale else scenarios.DEFAULT).scaled(args.factor)
    chosen = args.only or [s for s in SCENARIOS if s != "busy" or args.scale]
    specs = variants(args)
    work = (args.work or Path(tempfile.mkdtemp(prefix="mqtt-backup-bench-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ctx = scenarios.Context(sizes, work, specs, say=console.log)
    load_before = machine.load_average()
    started, t0 = datetime.now(UTC), time.monotonic()
    rows: list[scenarios.Row] = []
    try:
        for name in chosen:
            rows.extend(_one(name, ctx, console))
    finally:
        if args.work is None:
            scenarios.cleanup(work)
    load_after = machine.load_average()
    cores = os.cpu_count() or 1
    return {
        "schema": report.SCHEMA,
        "mode": ("scale" if args.scale else "default")
        + (f" x{args.factor:g}" if args.factor != 1 else ""),
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": machine.commit(),
        "seconds": time.monotonic() - t0,
        "bridge_command": shlex.join(
            ["python" if c == sys.executable else c for c in specs[0].command]
        ),
        "variants": [{"name": s.name, "run_args": shlex.join(s.run_args)} for s in specs],
        "scenarios": chosen,
        "sizes": dataclasses.asdict(sizes),
        "machine": machine.describe(),
        "load_before": load_before,
        "load_after": load_after,
        "loaded": max(load_before[0], load_after[0]) > cores,
        "rows": [r.as_json() for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; a failed scenario is one line and exit 1."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=True)
    if args.command == "docs":
        console.log(f"wrote {report.write_markdown(args.docs)}")
        return 0
    try:
        doc = run(args, console)
    except (BenchError, BrokerStartError) as exc:
        console.print(f"bench: {exc}")
        return 1
    report.print_table(doc, Console(width=250))
    out = args.json or args.docs / ("benchmarks-scale.json" if args.scale else "benchmarks.json")
    report.write_json(doc, out)
    console.log(f"wrote {out}")
    if not args.no_docs:
        console.log(f"wrote {report.write_markdown(args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
