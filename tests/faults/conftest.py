"""The fault suite's results: each test fills a `report`, and the session writes them as JSON.

`make faults` sets FAULTS_RESULTS (and FAULTS_SCALE=big); tools/reliability.py turns the file into
docs/reliability.md. Under `make test` nothing is written.

The cases where the ingest transport's own code decides the outcome run on both transports (the
`transport` fixture of tests/conftest.py, which bridges started as processes inherit): SIGTERM
under load (the goodbye), the network cut (a reset read) and blackhole (keepalive), injected disk
full (pausing and resuming reading) and message expiry during a stall (a broker restart while
holding: the reconnect and its room check). The others stay on the default (asyncio), as each
paho run costs seconds of `make test`'s budget: kill -9 runs no code of the transport; the broker
restart and crash add to those reconnects mostly the broker's side (its persistence, its lost
queue); gaps and their detection, damaged data, restores and a real full disk are the store's and
the restore side's. All of them passed on paho when this was decided.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Broker
from tests.faults.harness import SCALE, Tally

_RESULTS: list[dict[str, Any]] = []


@dataclass
class Report:
    """One case's figures for docs/reliability.md."""

    case: str
    test: str
    figures: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def __call__(self, **figures: Any) -> None:
        """Record figures (a Tally becomes its counts)."""
        for name, value in figures.items():
            self.figures[name] = value.as_json() if isinstance(value, Tally) else value

    def as_json(self, outcome: str) -> dict[str, Any]:
        """The results file's entry."""
        return {
            "case": self.case,
            "test": self.test,
            "outcome": outcome,
            "seconds": round(time.monotonic() - self.started, 1),
            **self.figures,
        }


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    """This test's report; its case name is the test's docstring's first line, or its name."""
    doc = (request.function.__doc__ or "").strip().splitlines()
    case = doc[0] if doc else request.node.name
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "transport" in callspec.params:  # a case on both transports
        case += f" ({callspec.params['transport']})"
    found = Report(case, request.node.nodeid.split("::", 1)[-1])
    request.node.stash[_REPORT] = found
    return found


BrokerFactory = Callable[..., Broker]


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Brokers of this test alone: mosquitto/dev.conf plus the given config lines."""
    started: list[Broker] = []

    def start(*lines: str) -> Broker:
        state = tmp_path / f"broker{len(started)}"
        state.mkdir()
        overlay = state / "overlay.conf"
        overlay.write_text("\n".join(lines) + "\n", encoding="utf-8")
        broker = Broker("dev.conf", state, (str(overlay),))
        broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


_REPORT = pytest.StashKey[Report]()
_OUTCOME = pytest.StashKey[str]()
_FAILURE = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each test's outcome (a failure in setup or teardown counts) for the results file."""
    rep = yield
    if rep.failed and item.stash.get(_OUTCOME, "") != "failed":
        item.stash[_OUTCOME] = "failed"
        item.stash[_FAILURE] = _first_line(rep.longreprtext) or str(call.excinfo)[:300]
    elif rep.when == "call" and _OUTCOME not in item.stash:
        item.stash[_OUTCOME] = rep.outcome
    if rep.when == "teardown" and _REPORT in item.stash:
        entry = item.stash[_REPORT].as_json(item.stash.get(_OUTCOME, "error"))
        if _FAILURE in item.stash:
            entry["failure"] = item.stash[_FAILURE]
        _RESULTS.append(entry)
    return rep


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("E ")]
    return lines[0][2:].strip()[:300] if lines else ""


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the results file when FAULTS_RESULTS names one."""
    del session
    target = os.environ.get("FAULTS_RESULTS")
    if not target or not _RESULTS:
        return
    document = {"scale": SCALE, "machine": machine(), "cases": _RESULTS}
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "commit": _output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": _output(["mosquitto", "-h"]).split("\n")[0].removeprefix("mosquitto "),
        "rocksdict": _version("rocksdict"),
        "paho_mqtt": _version("paho-mqtt"),
        "cpu": _cpu_model(),
    }


def _output(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
    except OSError:
        return "unknown"
    return (done.stdout or done.stderr).strip()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415 - only here

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _os_name() -> str:
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
    except OSError:
        return f"{platform.system()} ({sys.platform})"
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.system()


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
