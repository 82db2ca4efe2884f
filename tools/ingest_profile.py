"""Profile the ingest path without a broker: recorded PUBLISH bytes fed to the real wire and store.

    .venv/bin/python -m tools.ingest_profile [--messages 100000] [--window 1000] [--profile]

A fake transport stands for the socket: it hands the bridge's `_Wire` the packets a broker would
send (QoS 1, no properties, ~100 B JSON, 1,000 devices round-robin), never more than `--window`
unacknowledged, in reads of at most asyncio's 256 KiB, and counts the PUBACKs written back. The
commit pipeline and a real store in a temp dir do the rest, synced writes included. Prints the
process CPU (every thread) per 100k messages and the loop thread's share; `--profile` prints the
loop thread's cProfile. What the broker costs is not in it: this is the bridge's side alone.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import mqtt5

from bench import data
from mqtt_backup.config import BrokerAddress
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


async def run(args: argparse.Namespace, root: Path) -> tuple[float, float, float]:
    store = Store.open(root / "data", 4)
    session = Session(BrokerAddress("127.0.0.1", 1883), "profile")
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
    profiler = cProfile.Profile() if args.profile else None
    wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
    if profiler:
        profiler.enable()
    await feed(wire, transport, stream, args.window)
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    thread = time.thread_time() - thread
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
