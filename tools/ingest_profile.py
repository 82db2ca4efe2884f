"""Profile the ingest path without a broker: recorded PUBLISH bytes fed to the real wire and store.

    .venv/bin/python -m tools.ingest_profile [--messages 100000] [--devices 1000] [--partitions 1]
        [--window 1000] [--profile]

A fake transport stands for the socket: it hands the bridge's `_Wire` the packets a broker would
send (QoS 1, no properties, ~100 B JSON, 1,000 devices round-robin), never more than `--window`
unacknowledged, in reads of at most asyncio's 256 KiB, and counts the PUBACKs written back. The
commit pipeline and a real store in a temp dir do the rest, synced writes included. Prints the
process CPU (every thread) per 100k messages, by thread and the loop thread's share; `--profile`
prints the loop thread's cProfile. The cyclic GC is set as `mqtt-backup run` sets it. What the
broker costs is not in it: this is the bridge's side alone.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import mqtt5

from bench import data
from mqtt_backup.cli.run import quieter_gc
from mqtt_backup.config import BrokerAddress, BrokerTarget
from mqtt_backup.ingest import CommitPipeline
from mqtt_backup.mqtt.async_ingest import AsyncIngest, _Wire
from mqtt_backup.mqtt.session import Session
from mqtt_backup.storage import Store
from mqtt_backup.topics import Router, parse_template

READ_BYTES = 256 * 1024


class _Hooks:
    def connected(self, session_present: bool, subscribed: Any) -> None:
        pass

    def disconnected(self, reason: str) -> None:
        pass

    def tick(self) -> None:
        pass


class _Transport:
    """Counts the PUBACKs the bridge writes (each is 4 bytes)."""

    def __init__(self) -> None:
        self.acked = 0
        self.wrote = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.acked += len(data) // 4
        self.wrote.set()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def packets(n: int, devices: int) -> list[bytes]:
    """The PUBLISH packets a broker sends the bridge: QoS 1, packet ids 1..65535."""
    out = []
    for i, (topic, payload) in enumerate(data.fleet_messages(n, devices)):
        packet = mqtt5.PublishPacket(
            topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=i % 65535 + 1
        )
        out.append(packet.write())
    return out


async def feed(wire: _Wire, transport: _Transport, stream: list[bytes], window: int) -> None:
    """Hand the wire what the broker may send now, read by read, until everything is acked."""
    sent = 0
    while transport.acked < len(stream):
        room = min(len(stream), transport.acked + window) - sent
        if room <= 0:
            transport.wrote.clear()
            await transport.wrote.wait()
            continue
        chunk: list[bytes] = []
        size = 0
        while room and size < READ_BYTES:
            chunk.append(stream[sent])
            size += len(stream[sent])
            sent += 1
            room -= 1
        wire.data_received(b"".join(chunk))
        await asyncio.sleep(0)


def thread_seconds() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads so far, summed by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        seconds[name] = seconds.get(name, 0.0) + (int(stat[11]) + int(stat[12])) / tick
    return seconds


async def run(args: argparse.Namespace, root: Path) -> tuple[float, float, float]:
    store = Store.open(root / "data", args.partitions)
    session = Session(BrokerTarget(BrokerAddress("127.0.0.1", 1883)), "profile")
    ingest = AsyncIngest(session, ["devices/+/#"], _Hooks())
    pipeline = CommitPipeline(
        store, Router([parse_template("devices/{device}/#")], "mqtt-backup"), ingest.ack
    )
    ingest.sink = pipeline
    ingest._generation = 1
    wire = _Wire(ingest, pipeline, 1)
    ingest._wire = wire
    transport = _Transport()
    wire.transport = transport  # type: ignore[assignment]
    wire.serving = True
    stream = packets(args.messages, args.devices)
    quieter_gc()  # as `mqtt-backup run` does
    profiler = cProfile.Profile() if args.profile else None
    before = thread_seconds()
    wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
    if profiler:
        profiler.enable()
    await feed(wire, transport, stream, args.window)
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    thread = time.thread_time() - thread
    per = 100_000 / args.messages
    spent = {k: v - before.get(k, 0.0) for k, v in thread_seconds().items()}
    print(
        "CPU/100k by thread: "
        + ", ".join(
            f"{name} {s * per:.2f} s"
            for name, s in sorted(spent.items(), key=lambda kv: -kv[1])
            if s
        )
    )
    c = pipeline.counters
    print(
        f"{c.batches} commits, {c.stored / max(c.batches, 1):.0f} messages each, "
        f"{c.commit_seconds / max(c.batches, 1) * 1000:.1f} ms each in the commit thread"
    )
    if ingest._executor is not None:
        ingest._executor.shutdown()
    store.close()
    if profiler:
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)
    return wall, cpu, thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=1, help="of a new store (default 1)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ingest-profile-") as root:
        wall, cpu, thread = asyncio.run(run(args, Path(root)))
    per = 100_000 / args.messages
    print(
        f"{args.messages} messages in {wall:.2f} s ({args.messages / wall:,.0f} msg/s); "
        f"CPU/100k {cpu * per:.2f} s, loop thread {thread * per:.2f} s"
    )


if __name__ == "__main__":
    main()
