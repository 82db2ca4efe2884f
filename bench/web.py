"""The `web` scenario: page times of `mqtt-backup web` as a user runs it, and its download.

The web view runs as its own process (`mqtt-backup web --data DIR --bind 127.0.0.1:PORT`); the
bench asks for pages over one keep-alive connection and times each from request to last byte.
The figure that counts is bounded work: the same page of a big device (100k messages, 1M with
BENCH_SCALE) against a small one (1k), asked for in turns so that both see the same machine.
The download is set against `mqtt-backup export` of the same window, run in the same run.
"""

from __future__ import annotations

import heapq
import http.client
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import data
from bench.measure import percentile
from bench.procs import PRODUCT_CWD, BenchError, cpu_seconds
from bench.scenarios import Context, Row, Sizes
from mqtt_backup.web.history import READ_BUDGET
from tools import devbroker

NS_PER_S = 1_000_000_000
SMALL, BIG = "web-small", "web-big"
TICK_NS = NS_PER_S  # the small and the big device report once a second
FLEET_MESSAGES = 10  # each device of the fleet: this many, a minute apart
FLEET_INTERVAL_NS = 60 * NS_PER_S
WARMUP = 1  # requests per case before the clock runs (caches, first template render)
EXPORT_RUNS = 3  # the export reference: the fastest of this many runs, each side
WINDOWS = (("default window (1d)", ""), ("everything", "range=all"))
DEFAULT_WINDOW_TICKS = 86_400  # the page's default window (1d) in the big device's ticks
FORMATS = (("HTML", ""), ("JSON", "format=json"))
MS = 1000.0


# ---- the store ----------------------------------------------------------------------------------


def history(fleet: int, small: int, big: int, end_ns: int) -> Iterator[tuple[int, str, bytes]]:
    """(received ns, topic, payload) in time order, all ending just before end_ns.

    The fleet's devices report every minute, each at its own offset; the big device every
    second; the small one sparser, half a second off the big one's ticks, so that no two
    messages share a nanosecond. Sparser, but never so sparse that its default window holds
    fewer messages than a page reads at most (READ_BUDGET): a window below the budget is read
    whole and is cheaper, and the ratio would then weigh the budget against less work, not
    the big device against the small one (BENCH_SCALE's 100x sparser device held 864 in its
    day, and the ratio was 4.3 with the big page's cost the same as at 100k messages).
    """
    rng = random.Random(7)
    sparser = max(1, min(big // max(1, small), DEFAULT_WINDOW_TICKS // READ_BUDGET))
    streams = [_ticks(SMALL, small, end_ns - TICK_NS // 2, TICK_NS * sparser, rng)]
    streams.append(_ticks(BIG, big, end_ns, TICK_NS, rng))
    for j in range(fleet):
        last = end_ns - (j + 1) * FLEET_INTERVAL_NS // (fleet + 1)
        streams.append(_ticks(data.device_name(j), FLEET_MESSAGES, last, FLEET_INTERVAL_NS, rng))
    return heapq.merge(*streams)


def _ticks(
    device: str, count: int, end_ns: int, every_ns: int, rng: random.Random
) -> Iterator[tuple[int, str, bytes]]:
    topic = data.topic_of(device)
    for i in range(count):
        ts = end_ns - (count - i) * every_ns
        yield ts, topic, data.json_payload(rng, i, ts // 1_000_000)


# ---- the server and the client ------------------------------------------------------------------


def _env() -> dict[str, str]:
    """This environment without MQTT_BACKUP_* (a token or a data dir set for other work)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MQTT_BACKUP_")}


class WebView:
    """`mqtt-backup web` on a free loopback port, as a user starts it."""

    def __init__(self, command: Sequence[str], data_dir: Path, log: Path) -> None:
        self.port = devbroker.free_port()
        argv = [*command, "web", "--data", str(data_dir), "--bind", f"127.0.0.1:{self.port}"]
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, env=_env(), cwd=PRODUCT_CWD)

    def __enter__(self) -> WebView:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """The server's process id (its CPU is metered from /proc)."""
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until `/store` answers 200; BenchError with the log's tail when it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                raise BenchError(f"mqtt-backup web exited ({self.proc.returncode}): {tail}")
            probe = Pages(self.port)
            try:
                probe.get("/store")
            except (OSError, http.client.HTTPException, BenchError):
                if time.monotonic() > deadline:
                    raise BenchError(f"mqtt-backup web did not answer in {timeout:.0f} s") from None
                time.sleep(0.1)
                continue
            finally:
                probe.close()
            return

    def stop(self) -> None:
        """SIGTERM (uvicorn stops cleanly), then wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Pages:
    """One keep-alive HTTP/1.1 connection to the web view."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def get(self, path: str) -> bytes:
        """The whole body of a 200 answer; BenchError for any other status."""
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise BenchError(f"GET {path}: {resp.status} {body[:200]!r}")
        return body

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


class Timed:
    """Request times and the server's CPU seconds for one page, asked for again and again."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seconds: list[float] = []
        self.cpu = 0.0
        self.first = 0.0
        self.size = 0

    def once(self, pages: Pages, pid: int, counted: bool = True) -> bytes:
        """One request; counted ones go into the figures."""
        cpu = cpu_seconds(pid)
        start = time.monotonic()
        body = pages.get(self.path)
        took = time.monotonic() - start
        self.first = self.first or took
        if counted:
            self.seconds.append(took)
            self.cpu += cpu_seconds(pid) - cpu
        self.size = len(body)
        return body

    def figures(self) -> dict[str, Any]:
        """p50, p99 and the first (cold) time in ms; CPU ms per request; bytes per answer."""
        n = max(len(self.seconds), 1)
        return {
            "path": self.path,
            "requests": len(self.seconds),
            "p50_ms": percentile(self.seconds, 50) * MS,
            "p99_ms": percentile(self.seconds, 99) * MS,
            "first_ms": self.first * MS,
            "cpu_ms_per_request": self.cpu / n * MS,
            "bytes": self.size,
        }


def in_turns(pages: Pages, pid: int, cases: Sequence[Timed], requests: int) -> None:
    """WARMUP then `requests` rounds, each case once per round (a load spike hits all alike)."""
    for i in range(WARMUP + requests):
        for case in cases:
            case.once(pages, pid, counted=i >= WARMUP)


# ---- the scenario -------------------------------------------------------------------------------


def scenario(ctx: Context) -> list[Row]:
    """Page times at 1k devices and of a small vs a big device; the download vs `export`."""
    s = ctx.sizes
    fleet, small, big = s.web_fleet, s.web_small, s.web_big
    where = ctx.scratch("web")
    store = where / "data"
    ctx.say(f"web: a store of {fleet} devices, a {small}- and a {big}-message device")
    end_ns = time.time_ns() // NS_PER_S * NS_PER_S
    start = time.monotonic()
    written = data.prefill_at(store, history(fleet, small, big, end_ns))
    fill = {"messages": written, "fill_s": time.monotonic() - start}
    command = ctx.variants[0].command  # `mqtt-backup` as --bridge-command names it
    with WebView(command, store, where / "web.log") as view:
        view.wait_ready()
        pages = Pages(view.port)
        try:
            ctx.say(f"web: pages, {s.web_requests} requests each")
            rows = _devices_rows(pages, view.pid, fleet, s.web_requests, fill)
            rows += _device_rows(pages, view.pid, small, big, s.web_requests)
            ctx.say(f"web: download of {min(s.web_download, big)} messages, and export")
            rows.append(_download_row(pages, view.pid, command, store, end_ns, s))
        finally:
            pages.close()
    return rows


def _devices_rows(
    pages: Pages, pid: int, fleet: int, requests: int, fill: dict[str, Any]
) -> list[Row]:
    cases = [Timed("/"), Timed("/?format=json")]
    in_turns(pages, pid, cases, requests)
    return [
        Row(
            "web",
            f"devices page (/), {fleet + 2} devices",
            f"mqtt-backup web ({kind})",
            case.figures()["p50_ms"],
            "ms p50",
            details={**case.figures(), **fill},
        )
        for (kind, _), case in zip(FORMATS, cases, strict=True)
    ]


def _device_rows(pages: Pages, pid: int, small: int, big: int, requests: int) -> list[Row]:
    rows: list[Row] = []
    for window, query in WINDOWS:
        for kind, fmt in FORMATS:
            params = "&".join(p for p in (query, fmt) if p)
            suffix = f"?{params}" if params else ""
            ref, subject = Timed(f"/devices/{SMALL}{suffix}"), Timed(f"/devices/{BIG}{suffix}")
            in_turns(pages, pid, [ref, subject], requests)
            figures = {**subject.figures(), "records_read": _records_read(pages, subject.path)}
            reference = {**ref.figures(), "records_read": _records_read(pages, ref.path)}
            rows.append(
                Row(
                    "web",
                    f"device page, {window}, {big} messages",
                    f"mqtt-backup web ({kind})",
                    figures["p50_ms"],
                    "ms p50",
                    ref.figures()["p50_ms"],
                    f"the same page of a {small}-message device",
                    "flat: <= 2",
                    {**figures, "reference": reference},
                )
            )
    return rows


def _records_read(pages: Pages, path: str) -> int:
    """The records the page's plots read (its JSON twin says): both sides should be at the bound."""
    twin = json.loads(pages.get(f"{path}{'&' if '?' in path else '?'}format=json"))
    return int(twin["series"]["records_read"])


def _download_row(
    pages: Pages, pid: int, command: Sequence[str], store: Path, end_ns: int, s: Sizes
) -> Row:
    lines = min(s.web_download, s.web_big)
    since, until = str((end_ns - lines * TICK_NS) // NS_PER_S), str(end_ns // NS_PER_S)
    download = Timed(f"/devices/{BIG}/download.jsonl?since={since}&until={until}")
    in_turns(pages, pid, [download], max(3, s.web_requests // 3))
    body = download.once(pages, pid, counted=False)
    export = _export(command, store, since, until, body)
    figures = download.figures()
    return Row(
        "web",
        f"JSONL download, {lines} messages",
        "mqtt-backup web (download.jsonl)",
        lines / (figures["p50_ms"] / MS),
        "lines/s",
        export["lines_per_s"],
        "`mqtt-backup export` of the same window, net of its start-up",
        ">= 0.8",
        {**figures, "lines": lines, "reference": export},
    )


def _export(
    command: Sequence[str], store: Path, since: str, until: str, expect: bytes
) -> dict[str, Any]:
    """`export` of the window, fastest of EXPORT_RUNS, less its run on an empty window.

    The empty window (before 1970-01-01T00:00:01) costs what every run pays before its first
    line: the interpreter, the imports, opening the store. What is left is the lines' cost.
    """
    base = [*command, "export", "--data", str(store), "--device", BIG]
    full, empty = [], []
    for _ in range(EXPORT_RUNS):
        took, out = _run([*base, "--since", since, "--until", until])
        if out != expect:
            raise BenchError("the download and `export` of the same window differ")
        full.append(took)
        empty.append(_run([*base, "--since", "0", "--until", "1"])[0])
    lines = expect.count(b"\n")
    net = max(min(full) - min(empty), 1e-6)
    return {
        "lines_per_s": lines / net,
        "seconds": min(full),
        "start_up_s": min(empty),
        "runs": EXPORT_RUNS,
    }


def _run(argv: list[str]) -> tuple[float, bytes]:
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, check=False, env=_env(), cwd=PRODUCT_CWD)
    took = time.monotonic() - start
    if done.returncode != 0:
        raise BenchError(f"export failed: {done.stderr.decode(errors='replace').strip()}")
    return took, done.stdout
