"""The scenarios of `make bench`, each run beside its reference on the same broker in the same run.

Every figure is a ratio against something measured in this run (mosquitto_sub draining the same
queue, a pre-encoded publisher relaying the same sizes, the smallest case), so a slow or loaded
machine moves both sides. Each scenario returns rows (see `Row`) for the table and the JSON.
"""

from __future__ import annotations

import compileall
import json
import math
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mqtt_backup
from bench import data, wire
from bench.measure import Drain, drain, first_reaching, percentile
from bench.procs import (
    PRODUCT_CWD,
    BenchError,
    Bridge,
    BridgeSpec,
    Broker,
    Sampler,
    SysWatch,
    create_session,
    mosquitto_sub,
    peak_rss_bytes,
)

TOPIC_FILTER = "devices/+/#"
PER = 100_000  # CPU seconds are given per this many messages


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; `scaled()` shrinks them for a smoke run."""

    ingest: int = 300_000
    fleet: int = 1_000
    live_rate: int = 5_000
    live_seconds: float = 20.0
    restore: int = 100_000
    small_restores: int = 100
    storage: int = 100_000
    devices: tuple[int, ...] = (1_000, 100_000)
    device_messages: int = 100_000
    rebalance: int = 300_000
    restarts: int = 3
    busy_restore: int = 0  # > 0: ingest while a restore of this many messages runs
    web_fleet: int = 1_000  # devices on the devices page
    # messages of the web view's reference device: more than a page reads (READ_BUDGET, 8192),
    # so the ratio shows whether a page's cost stays flat beyond that, as designed (its default
    # window, a day, also holds more: bench/web.py spaces it at most 10 s apart)
    web_small: int = 10_000
    web_big: int = 100_000  # messages of the device whose page should cost the same
    web_download: int = 10_000
    web_requests: int = 15  # timed requests per page (p99: the slowest of them)

    def scaled(self, factor: float) -> Sizes:
        """Every count times factor (at least a few), durations too; for smoke runs."""

        def n(x: int) -> int:
            return max(10, int(x * factor))

        return Sizes(
            ingest=n(self.ingest),
            fleet=max(2, min(n(self.fleet), n(self.ingest))),
            live_rate=n(self.live_rate),
            live_seconds=max(1.0, self.live_seconds * factor),
            restore=n(self.restore),
            small_restores=max(3, int(self.small_restores * factor)),
            storage=n(self.storage),
            devices=tuple(n(d) for d in self.devices),
            device_messages=n(self.device_messages),
            rebalance=n(self.rebalance),
            restarts=max(1, min(self.restarts, int(self.restarts * factor) or 1)),
            busy_restore=n(self.busy_restore) if self.busy_restore else 0,
            web_fleet=n(self.web_fleet),
            web_small=n(self.web_small),
            web_big=n(self.web_big),
            web_download=n(self.web_download),
            web_requests=max(3, int(self.web_requests * factor)),
        )


DEFAULT = Sizes()
SCALE = Sizes(
    ingest=1_000_000,
    live_seconds=600.0,
    restore=1_000_000,
    devices=(1_000, 100_000, 1_000_000),
    device_messages=1_000_000,
    rebalance=1_000_000,
    busy_restore=1_000_000,
    web_big=1_000_000,
)


@dataclass
class Row:
    """One line of the table: a subject measured, its reference in the same run, their ratio."""

    scenario: str
    case: str
    subject: str
    value: float
    unit: str
    reference: float | None = None
    reference_subject: str = ""
    goal: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """Value / reference, when there is a reference."""
        if not self.reference:
            return None
        return self.value / self.reference

    def as_json(self) -> dict[str, Any]:
        """The row as the JSON file keeps it."""
        return {
            "scenario": self.scenario,
            "case": self.case,
            "subject": self.subject,
            "value": self.value,
            "unit": self.unit,
            "reference": self.reference,
            "reference_subject": self.reference_subject,
            "ratio": self.ratio,
            "goal": self.goal,
            "details": self.details,
        }


@dataclass
class Context:
    """What every scenario shares: sizes, a scratch directory, the bridge variants, a logger."""

    sizes: Sizes
    work: Path
    variants: list[BridgeSpec]
    say: Callable[[str], None] = print
    _serial: int = 0

    def scratch(self, name: str) -> Path:
        """A new empty directory under the work directory."""
        self._serial += 1
        path = self.work / f"{self._serial:02d}-{name}"
        path.mkdir(parents=True)
        return path

    def broker(self, name: str, conf: str = "stock", queue: int = 0) -> Broker:
        """A fresh Mosquitto whose queue limit holds `queue` messages."""
        return Broker(conf, self.scratch(f"broker-{name}"), max(queue * 2, 10_000))

    def bridge(self, spec: BridgeSpec, broker: Broker, name: str) -> Bridge:
        """A bridge (not started) on a new data directory."""
        where = self.scratch(f"bridge-{name}-{spec.name}")
        return Bridge(spec, broker, where / "data", f"bench-{name}-{spec.name}", where / "log")


# ---- helpers ------------------------------------------------------------------------------------


def preload(broker: Broker, messages: Iterator[tuple[str, bytes]], name: str) -> int:
    """Publish QoS 1 within the broker's Receive Maximum; returns how many were acknowledged."""
    client = broker.client(f"bench-preload-{name}")
    try:
        return client.publish_window(wire.qos1_packets(messages), client.receive_maximum)
    finally:
        client.disconnect()


def wait_ingesting(bridge: Bridge, broker: Broker, timeout: float = 120.0) -> None:
    """Until the bridge stores a probe message (so its session and subscription exist).

    Its metrics answer before it has subscribed, and a probe sent before that reaches nobody:
    send one every half second until the stored count moves.
    """
    deadline = time.monotonic() + timeout
    before = None
    while before is None:
        bridge.check_alive()
        if time.monotonic() > deadline:
            raise BenchError("the bridge's metrics endpoint never answered")
        time.sleep(0.05)
        before = bridge.stored()
    while True:
        preload(broker, iter([(data.topic_of("bench-probe"), b"probe")]), "probe")
        try:
            bridge.wait_stored(before + 1, 0.5, period=0.02)
        except BenchError:
            if time.monotonic() > deadline:
                raise
            continue
        return


def drain_figures(d: Drain, sampler: Sampler, who: str) -> dict[str, Any]:
    """msg/s, CPU per 100k messages of `who` and of the broker over the drain."""
    a, b = sampler.at(d.start), sampler.at(d.end)
    per = PER / max(d.messages, 1)
    return {
        "msg_per_s": d.rate,
        "seconds": d.end - d.start,
        "method": d.method,
        "cpu_s_per_100k": (b.cpu.get(who, 0.0) - a.cpu.get(who, 0.0)) * per,
        "broker_cpu_s_per_100k": (b.cpu["broker"] - a.cpu["broker"]) * per,
    }


class Consumer(Protocol):
    """What drains a preloaded queue: started once, then tells when it drained, at no cost to it."""

    def start(self) -> int:
        """Start; the process id to meter."""

    def events(self, sampler: Sampler) -> tuple[float, float] | None:
        """(first, last) moment of work seen from outside, when known."""


class SubConsumer:
    """mosquitto_sub -c -q 1 -C N: from its start (a C client connects in a millisecond) to exit."""

    def __init__(self, broker: Broker, client_id: str, n: int, log: Path) -> None:
        self.broker, self.client_id, self.n, self.log = broker, client_id, n, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = self.exited = 0.0
        self._waiter = threading.Thread(target=self._wait, name="bench.sub-exit", daemon=True)

    def start(self) -> int:
        """Spawn it and note when it exits."""
        self.started = time.monotonic()
        self.proc = mosquitto_sub(self.broker, self.client_id, TOPIC_FILTER, self.n, self.log)
        self._waiter.start()
        return self.proc.pid

    def _wait(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        self.exited = time.monotonic()

    def events(self, sampler: Sampler) -> tuple[float, float] | None:  # noqa: ARG002 (protocol)
        """Start to exit, once it exited."""
        self._waiter.join(timeout=60)
        return (self.started, self.exited) if self.exited else None


class BridgeConsumer:
    """The bridge: from the first to the last growth of its WAL files (a synced commit each)."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def start(self) -> int:
        """Start the bridge process."""
        return self.bridge.start().pid

    def events(self, sampler: Sampler) -> tuple[float, float] | None:
        """First and last WAL growth after the start."""
        seen = [t for t in sampler.wal_writes if t >= self.bridge.started_at]
        return (seen[0], seen[-1]) if len(seen) >= 2 else None


def preload_queue(
    broker: Broker, watch: SysWatch, messages: Iterator[tuple[str, bytes]], name: str
) -> int:
    """Preload a queue; returns the store count before it (the level the drain goes back to).

    The count must have settled first: with persistence (mosquitto/dev.conf, autosave every
    5 s) the messages of a drained session left the count for a while after, and a level read
    then lay thousands below the one the next drain comes back to (it never ended).
    """
    quiet = SETTLED_S if broker.conf != "stock" else STOCK_SETTLED_S
    before = watch.settled(quiet, timeout=120)
    preload(broker, messages, name)
    return before


SETTLED_S = 6.0  # longer than dev.conf's autosave_interval
# A stock Mosquitto keeps nothing on disk (no autosave): two of its $SYS counts (sys_interval 1)
# alike are a settled count, and each preload of a run on it waited 4 s less.
STOCK_SETTLED_S = 2.1
STALL_S = 120.0  # a drain whose store count has not moved for this long has failed


def _wait_drained(watch: SysWatch, since: float, level: int, timeout: float) -> None:
    """Until the store count is down to `level`; BenchError when it stalls or takes too long."""
    deadline = time.monotonic() + timeout
    last_value, last_move = -1, time.monotonic()
    while True:
        seen = [(t, v) for t, v in watch.values[SysWatch.STORE] if t > since]
        if any(v <= level for _, v in seen):
            return
        if seen and seen[-1][1] != last_value:
            last_value, last_move = seen[-1][1], time.monotonic()
        now = time.monotonic()
        if now - last_move > STALL_S:
            raise BenchError(
                f"the drain stalled for {STALL_S:.0f} s: store count {last_value}, "
                f"never down to {level} (the count before the preload plus slack)"
            )
        if now > deadline:
            raise BenchError(f"the queue did not drain in {timeout:.0f} s ({last_value} left)")
        time.sleep(0.1)


def measure_drain(
    broker: Broker,
    watch: SysWatch,
    consumer: Consumer,
    n: int,
    before: int,
    timeout: float,
    wal_dir: Path | None = None,
) -> tuple[Drain, Sampler]:
    """Start the consumer on a queue of n messages preloaded on a store count of `before`."""
    slack = max(50, n // 500)  # $SYS retained messages come and go in the store count
    full = before + n
    watch.wait(lambda v: v >= full - slack, 120, f"{n} preloaded messages in the store count")
    time.sleep(2.1)  # one more count: the preload has settled
    full = watch.latest()
    base = full - n
    # What earlier scenarios left dirty in the page cache would be written back during this
    # drain, under the bridge's WAL fsyncs (the 1k-device drain took 3.4 s after the restore
    # scenario, 1.5 s alone): written back now, before the clock starts.
    os.sync()
    since = time.monotonic()
    pids = {"broker": broker.pid}
    with Sampler(pids, period=0.01, wal_dir=wal_dir) as sampler:
        pids["consumer"] = consumer.start()
        try:
            _wait_drained(watch, since, base + slack, timeout)
        except BenchError as exc:
            raise BenchError(f"{type(consumer).__name__}: {exc}") from exc
        time.sleep(0.1)
    events = consumer.events(sampler)
    return drain(watch.values[SysWatch.STORE], since, full, base, events), sampler


# ---- ingest -------------------------------------------------------------------------------------


def ingest(ctx: Context, conf: str) -> list[Row]:
    """Drain of the same preloaded queue by mosquitto_sub -c -q 1 and by each bridge variant."""
    n, fleet = ctx.sizes.ingest, ctx.sizes.fleet
    case = "stock Mosquitto" if conf == "stock" else f"mosquitto/{conf}"
    ctx.say(f"ingest on {case}: {n} messages, {fleet} devices")
    rows: list[Row] = []
    # A fresh broker of the same config for each consumer: on one with persistence
    # (mosquitto/dev.conf) the messages of the drained reference session left the store count
    # at a later autosave, after the bridge's preload had been counted, and its drain then
    # waited for a level the count never reached (BENCH_SCALE and a default run stalled so).
    with ctx.broker(f"ingest-{conf}-sub", conf, n) as broker, SysWatch(broker) as watch:
        ref = _drain_by_sub(ctx, broker, watch, n, fleet)
    for spec in ctx.variants:
        with ctx.broker(f"ingest-{conf}-{spec.name}", conf, n) as broker, SysWatch(broker) as watch:
            figures = _drain_by_bridge(ctx, spec, broker, watch, n, fleet)
            rows.append(
                Row(
                    "ingest",
                    case,
                    f"bridge ({spec.name})",
                    figures["msg_per_s"],
                    "msg/s",
                    ref["msg_per_s"],
                    "mosquitto_sub -c -q 1",
                    ">= 1.0 (stock)" if conf == "stock" else "",
                    {**figures, "reference": ref, "messages": n, "devices": fleet},
                )
            )
    return rows


def _drain_by_sub(
    ctx: Context, broker: Broker, watch: SysWatch, n: int, fleet: int
) -> dict[str, Any]:
    client_id = "bench-sub"
    create_session(broker, client_id, TOPIC_FILTER)
    before = preload_queue(broker, watch, data.fleet_messages(n, fleet), "sub")
    consumer = SubConsumer(broker, client_id, n, ctx.scratch("mosquitto-sub") / "log")
    d, sampler = measure_drain(broker, watch, consumer, n, before, timeout=600)
    # Its session goes, so that the next preload is queued for the bridge alone.
    broker.client(client_id, clean_start=True).disconnect()
    return {**drain_figures(d, sampler, "consumer"), "peak_rss_bytes": 0}


def _drain_by_bridge(
    ctx: Context, spec: BridgeSpec, broker: Broker, watch: SysWatch, n: int, fleet: int
) -> dict[str, Any]:
    bridge = ctx.bridge(spec, broker, "ingest")
    bridge.start()
    try:
        wait_ingesting(bridge, broker)
    finally:
        bridge.stop()
    before = preload_queue(broker, watch, data.fleet_messages(n, fleet), f"bridge-{spec.name}")
    try:
        d, sampler = measure_drain(
            broker, watch, BridgeConsumer(bridge), n, before, timeout=1800, wal_dir=bridge.data
        )
        peak = peak_rss_bytes(bridge.pid)
    finally:
        bridge.stop()
    # Its session goes, so that the next preload on this broker is queued for the next one alone.
    broker.client(bridge.client_id, clean_start=True).disconnect()
    return {**drain_figures(d, sampler, "consumer"), "peak_rss_bytes": peak}


# ---- live ingest --------------------------------------------------------------------------------


class Paced:
    """A publisher thread at a fixed offered rate; keeps the send time of every message."""

    def __init__(self, broker: Broker, rate: int, seconds: float, fleet: int) -> None:
        self.client = broker.client("bench-paced")
        self.rate, self.seconds, self.fleet = rate, seconds, fleet
        self.sent_at: list[float] = []
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench.paced", daemon=True)

    def _run(self) -> None:
        messages = data.fleet_messages(int(self.rate * self.seconds) + 1, self.fleet)
        start = time.monotonic()
        while not self.stop_flag.is_set():
            now = time.monotonic()
            if now - start >= self.seconds:
                break
            due = int((now - start) * self.rate) + 1 - len(self.sent_at)
            batch = [m for _, m in zip(range(due), messages, strict=False)]
            if batch:
                self.sent_at.extend([now] * len(batch))
                self.client.publish_window(wire.qos1_packets(batch), self.client.receive_maximum)
            time.sleep(0.002)
        self.client.disconnect()


def live(ctx: Context) -> list[Row]:
    """Publishers at a fixed offered rate; the bridge keeping up: lag and publish-to-stored."""
    rate, seconds, fleet = ctx.sizes.live_rate, ctx.sizes.live_seconds, ctx.sizes.fleet
    ctx.say(f"live ingest: {rate} msg/s offered for {seconds:.0f} s")
    rows: list[Row] = []
    for spec in ctx.variants:
        with ctx.broker("live", queue=int(rate * seconds)) as broker, SysWatch(broker) as watch:
            bridge = ctx.bridge(spec, broker, "live").start()
            try:
                wait_ingesting(bridge, broker)
                rows.append(_live_run(bridge, broker, watch, rate, seconds, fleet))
            finally:
                bridge.stop()
    return rows


def _live_run(
    bridge: Bridge, broker: Broker, watch: SysWatch, rate: int, seconds: float, fleet: int
) -> Row:
    base = bridge.stored() or 0
    paced = Paced(broker, rate, seconds, fleet)
    scrapes: list[tuple[float, int]] = []
    with Sampler({"bridge": bridge.pid, "broker": broker.pid}) as sampler:
        paced.thread.start()
        while paced.thread.is_alive() or (scrapes and scrapes[-1][1] < base + len(paced.sent_at)):
            got = bridge.stored()
            if got is not None:
                scrapes.append((time.monotonic(), got))
            if time.monotonic() - sampler.samples[0].t > seconds * 3 + 30:
                break
            time.sleep(0.01)
    sent = paced.sent_at
    stored_at = first_reaching(scrapes, [base + i + 1 for i in range(len(sent))])
    latency = [s - p for s, p in zip(stored_at, sent, strict=True) if not math.isnan(s)]
    lag = [
        sum(1 for p in sent if p <= t) - (count - base)
        for t, count in scrapes[:: max(1, len(scrapes) // 2000)]
    ]
    tenth = max(1, len(sampler.samples) // 10)
    rss_first = max(s.rss["bridge"] for s in sampler.samples[:tenth])
    rss_last = max(s.rss["bridge"] for s in sampler.samples[-tenth:])
    broker_queue = [v for t, v in watch.values[SysWatch.STORE] if t >= sampler.samples[0].t]
    # Stored per second from the first send to the last message stored (catching up included).
    done_at = max((t for t in stored_at if not math.isnan(t)), default=0.0)
    achieved = len(latency) / max(done_at - sent[0], 1e-9) if sent else 0.0
    return Row(
        "live ingest",
        f"{rate} msg/s offered, {seconds:.0f} s",
        f"bridge ({bridge.spec.name})",
        percentile(latency, 99) * 1000,
        "ms p99 publish-to-stored",
        goal="keeps up (lag stays small); RSS flat",
        details={
            "offered_msg_per_s": rate,
            "stored_msg_per_s": achieved,
            "published": len(sent),
            "stored": len(latency),
            "p50_ms": percentile(latency, 50) * 1000,
            "p99_ms": percentile(latency, 99) * 1000,
            "max_ms": max(latency, default=0.0) * 1000,
            "max_lag_messages": max(lag, default=0),
            "max_broker_store_count": max(broker_queue, default=0),
            "rss_first_tenth_bytes": rss_first,
            "rss_last_tenth_bytes": rss_last,
            "resolution_ms": 10,
            "note": "stored time = first metrics scrape (every 10 ms) that counts the message",
        },
    )


# ---- restore ------------------------------------------------------------------------------------

RESTORE_DEVICE, SMALL_DEVICE = "dev-restore", "dev-small"
SMALL_COUNT = 10


def restore(ctx: Context) -> list[Row]:
    """100k messages of one device to mosquitto_sub vs the relay ceiling; first-message times."""
    n = ctx.sizes.restore
    ctx.say(f"restore: {n} messages of one device; {ctx.sizes.small_restores} small restores")
    rows: list[Row] = []
    payloads = [p for _, p in data.fleet_messages(n, 1)]
    sizes = [data.restore_envelope_size(RESTORE_DEVICE, p, i + 1) for i, p in enumerate(payloads)]
    for spec in ctx.variants:
        with ctx.broker("restore", queue=n) as broker:
            bridge = ctx.bridge(spec, broker, "restore")
            messages = _restore_store(payloads)
            data.prefill(bridge.data, messages, client_id=bridge.client_id)
            bridge.start()
            try:
                wait_ingesting(bridge, broker)
                ceiling = _relay_ceiling(ctx, broker, sizes)
                restored = _restore_big(ctx, bridge, broker, n)
                first, round_trip = _small_restores(broker, ctx.sizes.small_restores)
            finally:
                bridge.stop()
        rows.append(
            Row(
                "restore",
                f"{n} messages of one device",
                f"bridge ({spec.name})",
                restored["msg_per_s"],
                "msg/s",
                ceiling["msg_per_s"],
                "relay ceiling (pre-encoded, Receive Maximum)",
                ">= 0.9",
                {"reference": ceiling, **restored, "mean_message_bytes": sum(sizes) / len(sizes)},
            )
        )
        rows.append(
            Row(
                "restore",
                f"first message, {ctx.sizes.small_restores} restores of {SMALL_COUNT}",
                f"bridge ({spec.name})",
                first["p50_ms"],
                "ms p50",
                goal="p50 <= 5 ms",
                details={**first, "broker_round_trip": round_trip},
            )
        )
    return rows


def _restore_store(payloads: list[bytes]) -> Iterator[tuple[str, bytes]]:
    yield from ((data.topic_of(RESTORE_DEVICE), p) for p in payloads)
    yield from ((data.topic_of(SMALL_DEVICE), p) for p in payloads[:SMALL_COUNT])


def _timed_sub(ctx: Context, broker: Broker, topic: str, count: int) -> subprocess.Popen[bytes]:
    """mosquitto_sub -c on a session made beforehand: what comes before it connects waits for it.

    So the clock can start at once, with no guess at when its subscription is in place.
    """
    client_id = f"bench-rsub-{time.monotonic_ns()}"
    create_session(broker, client_id, topic)
    return mosquitto_sub(broker, client_id, topic, count, ctx.scratch("rsub") / "log")


def _relay_ceiling(ctx: Context, broker: Broker, sizes: list[int]) -> dict[str, Any]:
    topic = "bench/relay"
    packets = list(wire.qos1_packets((topic, b"x" * s) for s in sizes))
    sub = _timed_sub(ctx, broker, topic, len(packets))
    client = broker.client("bench-relay")
    pids = {"broker": broker.pid, "sub": sub.pid}
    with Sampler(pids) as sampler:
        start = time.monotonic()
        client.publish_window(iter(packets), client.receive_maximum)
        sub.wait(timeout=600)
        end = time.monotonic()
    client.disconnect()
    a, b = sampler.at(start), sampler.at(end)
    return {
        "msg_per_s": len(packets) / (end - start),
        "window": client.receive_maximum,
        "broker_cpu_s_per_100k": (b.cpu["broker"] - a.cpu["broker"]) * PER / len(packets),
    }


def _restore_big(ctx: Context, bridge: Bridge, broker: Broker, n: int) -> dict[str, Any]:
    topic = f"backup/restore/{RESTORE_DEVICE}"
    sub = _timed_sub(ctx, broker, f"{topic}/response", n + 1)  # the messages and `done`
    client = broker.client("bench-restore-request")
    pids = {"broker": broker.pid, "bridge": bridge.pid}
    with Sampler(pids) as sampler:
        start = time.monotonic()
        client.sock.sendall(wire.publish_packet(topic, b"", client.packet_id()))
        sub.wait(timeout=3600)
        end = time.monotonic()
        peak = peak_rss_bytes(bridge.pid)
    client.disconnect()
    a, b = sampler.at(start), sampler.at(end)
    return {
        "msg_per_s": n / (end - start),
        "seconds": end - start,
        "cpu_s_per_100k": (b.cpu["bridge"] - a.cpu["bridge"]) * PER / n,
        "broker_cpu_s_per_100k": (b.cpu["broker"] - a.cpu["broker"]) * PER / n,
        "peak_rss_bytes": peak,
    }


def _small_restores(broker: Broker, count: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time from request to the first answer, over `count` restores (each awaited to its end)."""
    client = broker.client("bench-small")
    topic = f"backup/restore/{SMALL_DEVICE}"
    client.subscribe(f"{topic}/response")
    client.subscribe("bench/echo")
    firsts: list[float] = []
    for i in range(count):
        start = time.monotonic()
        client.sock.sendall(wire.publish_packet(topic, json.dumps({"id": str(i)}).encode()))
        first = 0.0
        while True:
            done = False
            for pkt in client.read():
                if pkt.kind != wire.PUBLISH:
                    continue
                first = first or time.monotonic() - start
                _, ident, payload = wire.publish_parts(pkt)
                if ident:
                    client.sock.sendall(bytes((wire.PUBACK, 2)) + ident.to_bytes(2, "big"))
                done = done or b'"done"' in payload or b'"error"' in payload
            if done:
                break
        firsts.append(first)
    trips: list[float] = []
    for _ in range(count):  # the broker's own round trip: publish to a topic we read
        start = time.monotonic()
        client.sock.sendall(wire.publish_packet("bench/echo", b"x" * 200))
        while not any(p.kind == wire.PUBLISH for p in client.read()):
            pass
        trips.append(time.monotonic() - start)
    client.disconnect()
    ms = 1000.0
    return (
        {"p50_ms": percentile(firsts, 50) * ms, "p99_ms": percentile(firsts, 99) * ms},
        {"p50_ms": percentile(trips, 50) * ms, "p99_ms": percentile(trips, 99) * ms},
    )


# ---- storage ------------------------------------------------------------------------------------


def storage(ctx: Context) -> list[Row]:
    """Disk bytes per message vs topic + payload bytes, for JSON and binary telemetry."""
    n, fleet = ctx.sizes.storage, ctx.sizes.fleet
    ctx.say(f"storage: {n} JSON and {n} binary messages over {fleet} devices")
    rows = []
    for kind in ("json", "binary"):
        where = ctx.scratch(f"storage-{kind}") / "data"
        raw = sum(len(t) + len(p) for t, p in data.fleet_messages(n, fleet, kind))
        data.prefill(where, data.fleet_messages(n, fleet, kind))
        data.prefill(where, iter([]))  # reopened: the WAL is recovered into compressed tables
        disk = data.disk_bytes(where)
        rows.append(
            Row(
                "storage",
                f"{kind} telemetry, {n} messages",
                "RocksDB partitions",
                disk / n,
                "disk bytes/message",
                raw / n,
                "topic + payload bytes",
                "<= 0.5 (JSON)" if kind == "json" else "",
                {"disk_bytes": disk, "raw_bytes": raw, "messages": n},
            )
        )
    return rows


# ---- devices ------------------------------------------------------------------------------------


def devices(ctx: Context) -> list[Row]:
    """Drain rate and peak RSS at growing numbers of distinct devices."""
    rows: list[Row] = []
    for spec in ctx.variants:
        first_rate = 0.0
        for count in ctx.sizes.devices:
            n = max(count, ctx.sizes.device_messages)
            ctx.say(f"devices: {count} devices, {n} messages ({spec.name})")
            with ctx.broker(f"devices-{count}", queue=n) as broker, SysWatch(broker) as watch:
                figures = _drain_by_bridge(ctx, spec, broker, watch, n, count)
            first_rate = first_rate or figures["msg_per_s"]
            rows.append(
                Row(
                    "devices",
                    f"{count} devices, {n} messages",
                    f"bridge ({spec.name})",
                    figures["msg_per_s"],
                    "msg/s",
                    first_rate,
                    f"bridge at {ctx.sizes.devices[0]} devices",
                    "flat rate; RSS <= 150 MB at 100k",
                    figures,
                )
            )
    return rows


# ---- operations ---------------------------------------------------------------------------------


def operations(ctx: Context) -> list[Row]:
    """Rebalance (partitions add) MB/s moved; time from kill -9 to ingesting again."""
    rows: list[Row] = []
    for spec in ctx.variants:
        rows.append(_rebalance(ctx, spec))
        rows.extend(_restarts(ctx, spec))
    return rows


def _rebalance(ctx: Context, spec: BridgeSpec) -> Row:
    n = ctx.sizes.rebalance
    ctx.say(f"operations: rebalance of {n} messages ({spec.name})")
    where = ctx.scratch(f"rebalance-{spec.name}") / "data"
    data.prefill(where, data.fleet_messages(n, ctx.sizes.fleet))
    argv = [*spec.command, "partitions", "add", "p4", "--data", str(where), "--json"]
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, check=False, cwd=PRODUCT_CWD)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise BenchError(f"partitions add failed: {done.stderr.decode(errors='replace').strip()}")
    result = json.loads(done.stdout)
    moved = int(result["bytes"])
    return Row(
        "operations",
        f"partitions add p4 on {n} messages",
        f"mqtt-backup ({spec.name})",
        moved / 1e6 / seconds,
        "MB/s moved",
        details={
            "seconds": seconds,
            "moved_bytes": moved,
            "moved_messages": result["messages"],
            "note": "wall time of the command, process start included",
        },
    )


def _restarts(ctx: Context, spec: BridgeSpec) -> list[Row]:
    ctx.say(f"operations: kill -9 and restart, {ctx.sizes.restarts} times ({spec.name})")
    # Start as an installed package does (pip writes the bytecode): a source tree run with
    # PYTHONDONTWRITEBYTECODE=1 would compile every module at every start (~0.3 s of CPU).
    compileall.compile_dir(Path(mqtt_backup.__file__).parent, quiet=1)
    rate = 2_000
    seconds = 30.0 + 10 * ctx.sizes.restarts
    with ctx.broker("restarts", queue=int(rate * seconds)) as broker:
        bridge = ctx.bridge(spec, broker, "restarts").start()
        paced = Paced(broker, rate, seconds, ctx.sizes.fleet)
        try:
            wait_ingesting(bridge, broker)
            bridge.stop()
            paced.thread.start()
            start = time.monotonic()
            bridge.start()
            cold = bridge.wait_stored(1, 60, period=0.002) - start
            downs: list[float] = []
            for _ in range(ctx.sizes.restarts):
                time.sleep(0.5)
                killed = bridge.kill()
                bridge.start()
                downs.append(bridge.wait_stored(1, 60, period=0.002) - killed)
        finally:
            paced.stop_flag.set()
            bridge.stop()
            paced.thread.join()
    return [
        Row(
            "operations",
            f"kill -9, restarted at once ({len(downs)} times, {rate} msg/s offered)",
            f"bridge ({spec.name})",
            percentile(downs, 50),
            "s to ingesting again (median)",
            goal="<= 0.5 s",
            details={"each_s": downs, "cold_start_s": cold},
        )
    ]


# ---- ingest beside a big restore (BENCH_SCALE) --------------------------------------------------


def busy_ingest(ctx: Context) -> list[Row]:
    """Drain of a preloaded queue while a big restore runs, vs the same drain idle."""
    n, big = ctx.sizes.ingest, ctx.sizes.busy_restore or ctx.sizes.restore
    rows: list[Row] = []
    payloads = [p for _, p in data.fleet_messages(min(big, 100_000), 1)]
    for spec in ctx.variants:
        ctx.say(f"ingest beside a restore of {big} messages ({spec.name})")
        with ctx.broker("busy", queue=n + big) as broker, SysWatch(broker) as watch:
            bridge = ctx.bridge(spec, broker, "busy")
            stored = (
                (data.topic_of(RESTORE_DEVICE), payloads[i % len(payloads)]) for i in range(big)
            )
            data.prefill(bridge.data, stored, client_id=bridge.client_id)
            idle = _drain_by_bridge(ctx, spec, broker, watch, n, ctx.sizes.fleet)
            bridge.start()
            try:
                wait_ingesting(bridge, broker)
            finally:
                bridge.stop()
            before = preload_queue(broker, watch, data.fleet_messages(n, ctx.sizes.fleet), "busy")
            sub = _timed_sub(ctx, broker, f"backup/restore/{RESTORE_DEVICE}/response", big + 1)
            consumer = RestoringConsumer(bridge, broker, f"backup/restore/{RESTORE_DEVICE}")
            try:
                d, sampler = measure_drain(
                    broker, watch, consumer, n, before, timeout=3600, wal_dir=bridge.data
                )
                busy = drain_figures(d, sampler, "consumer")
            finally:
                sub.kill()
                bridge.stop()
        rows.append(
            Row(
                "ingest beside restore",
                f"{n} messages while {big} are restored",
                f"bridge ({spec.name})",
                busy["msg_per_s"],
                "msg/s",
                idle["msg_per_s"],
                "the same drain, idle",
                ">= 0.7",
                {
                    "busy": busy,
                    "idle": idle,
                    "note": "the store count includes restore answers in flight (a few)",
                },
            )
        )
    return rows


class RestoringConsumer(BridgeConsumer):
    """The bridge, asked for a big restore as soon as it is up."""

    def __init__(self, bridge: Bridge, broker: Broker, request_topic: str) -> None:
        super().__init__(bridge)
        self.broker, self.request_topic = broker, request_topic

    def start(self) -> int:
        """Start the bridge; once its metrics answer, send the restore request."""
        pid = super().start()
        wait_port_metrics(self.bridge)
        req = self.broker.client("bench-busy-request")
        req.sock.sendall(wire.publish_packet(self.request_topic, b"", req.packet_id()))
        req.disconnect()
        return pid


def wait_port_metrics(bridge: Bridge, timeout: float = 30.0) -> None:
    """Until the bridge's metrics endpoint answers (it is up and connected)."""
    deadline = time.monotonic() + timeout
    while bridge.stored() is None:
        bridge.check_alive()
        if time.monotonic() > deadline:
            raise BenchError("the bridge's metrics endpoint never answered")
        time.sleep(0.02)


def cleanup(work: Path) -> None:
    """Remove the scratch directories (data dirs can be large)."""
    shutil.rmtree(work, ignore_errors=True)
