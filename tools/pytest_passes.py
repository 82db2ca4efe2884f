"""`make test`'s pytest: the suite over the cores, then the `serial` tests alone.

Pass 1 spreads every test not marked `serial` over PYTEST_WORKERS pytest-xdist workers
(`--dist loadgroup`: an `xdist_group` keeps to one worker). Pass 2 runs the `serial` tests in
one process, with nothing else running beside them: the real full-disk tests time their disk's
fill and RocksDB's background work, which other workers' load changes (pyproject.toml, markers).
PYTEST_WORKERS=0 runs everything in one process, in one pass.

Extra pytest arguments come after `--` (the Makefile passes PYTEST_ARGS). A `-m EXPR` among them
narrows both passes: pass 1 runs `(EXPR) and not serial`, pass 2 `(EXPR) and serial`. One pass
may collect nothing (exit code 5) when the other ran tests, e.g. PYTEST_ARGS naming one file;
both empty is a failure. A closing line sums both passes (CI reads it).

    python -m tools.pytest_passes [--workers N|auto] [-- PYTEST_ARGS...]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

NO_TESTS = 5  # pytest's exit code when nothing was collected (or everything was deselected)
STOP_CODES = (2, 3, 4)  # interrupted, internal error, usage error: the second pass would too
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b")


@dataclass
class Outcome:
    """One pass: its exit code, wall time and the counts of its closing line."""

    name: str
    code: int
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)


def split_markexpr(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """The user's `-m` expression (the last one wins, as in pytest) and the other arguments."""
    expr, rest = None, []
    it = iter(args)
    for arg in it:
        if arg == "-m":
            expr = next(it, None)
        elif arg.startswith("-m") and not arg.startswith("--"):
            expr = arg[2:].removeprefix("=")
        else:
            rest.append(arg)
    return expr, rest


def narrowed(expr: str | None, serial: bool) -> str:
    """The pass's marker expression: the user's, and (not) serial."""
    own = "serial" if serial else "not serial"
    return own if not expr else f"({expr}) and {own}"


def run_pass(name: str, args: Sequence[str]) -> Outcome:
    """Run pytest, echoing its output; keep its closing line's counts."""
    cmd = [sys.executable, "-m", "pytest", *args]
    print(f"==> {name}: {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    last = ""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if line.strip():
                last = line
    outcome = Outcome(name, proc.returncode, time.monotonic() - started)
    for number, word in _COUNT.findall(last):
        key = "errors" if word.startswith("error") else word
        outcome.counts[key] = outcome.counts.get(key, 0) + int(number)
    print(f"==> {name}: exit {outcome.code} in {outcome.seconds:.0f} s", flush=True)
    return outcome


def verdict(outcomes: Sequence[Outcome]) -> int:
    """The exit code of the whole: the first failure; 5 only when no pass ran any test."""
    for outcome in outcomes:
        if outcome.code not in (0, NO_TESTS):
            return outcome.code
    return NO_TESTS if all(o.code == NO_TESTS for o in outcomes) else 0


def closing_line(outcomes: Sequence[Outcome]) -> str:
    """`tests: N passed, N failed, N skipped` over every pass (errors count as failed)."""
    total: dict[str, int] = {}
    for outcome in outcomes:
        for key, number in outcome.counts.items():
            total[key] = total.get(key, 0) + number
    passed, skipped = total.get("passed", 0), total.get("skipped", 0)
    failed = total.get("failed", 0) + total.get("errors", 0)
    return f"tests: {passed} passed, {failed} failed, {skipped} skipped"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the passes; exit with `verdict`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="auto", help="pytest-xdist -n (0: one process)")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    options = parser.parse_args(argv)
    colour = ["--color=yes"] if sys.stdout.isatty() else []
    if options.workers == "0":
        outcomes = [run_pass("all tests, one process", [*colour, "-n", "0", *options.pytest_args])]
    else:
        expr, rest = split_markexpr(options.pytest_args)
        spread = ["-n", options.workers, "--dist", "loadgroup"]
        outcomes = [
            run_pass("pass 1, not serial", [*colour, *spread, "-m", narrowed(expr, False), *rest])
        ]
        if outcomes[0].code not in STOP_CODES:
            outcomes.append(
                run_pass("pass 2, serial", [*colour, "-m", narrowed(expr, True), *rest])
            )
    for outcome in outcomes:
        print(f"{outcome.name}: exit {outcome.code}, {outcome.seconds:.0f} s, {outcome.counts}")
    code = verdict(outcomes)
    if code == NO_TESTS:
        print("no pass collected any test: check PYTEST_ARGS", file=sys.stderr)
    print(closing_line(outcomes), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
