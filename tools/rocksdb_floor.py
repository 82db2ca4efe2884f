"""The floor under the ingest CPU goal: what RocksDB alone costs per message, no MQTT at all.

    .venv/bin/python -m tools.rocksdb_floor [--messages 100000] [--devices 1000] [--rounds 6]

Issue 10 asks for a bridge CPU per message of at most a third of the broker's (the broker spends
~8.6 us per message of a preloaded drain on this machine kind: the goal is ~2.9 us). This puts
the messages' keys and ~110-byte values into one RocksDB through rocksdict, in synced WriteBatches
of 1,000 as a group commit does, in key order per device as the storage layout makes them
(DESIGN.md section 2: one key per message), once with the records alone and once with a per-device
index entry per message too (what a commit of about one message per device writes). Nothing is
parsed, routed or acknowledged: the process CPU per message printed is a lower bound of any bridge
that keeps one RocksDB key per message. Minimum over `--rounds`, a fresh database each time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import tempfile
import time

import mmh3
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

COMMIT = 1000
VALUE_BYTES = 110  # a stored record of ~100 B of JSON telemetry and its topic, before compression
ENTRY_BYTES = 40  # an index entry: first, last, count, size, dups


def _keys(messages: int, devices: int) -> list[bytes]:
    dev_keys = [mmh3.hash_bytes(f"device-{i}".encode()) for i in range(devices)]
    start = time.time_ns()
    return [dev_keys[i % devices] + struct.pack(">QI", start + i, i) for i in range(messages)]


def _cpu_per_message(keys: list[bytes], index: bool) -> float:
    """Process CPU in microseconds per message for one fresh database."""
    where = tempfile.mkdtemp(prefix="rocksdb-floor-")
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    db = Rdict(where, options)
    synced = WriteOptions()
    synced.sync = True
    value, entry = os.urandom(VALUE_BYTES), os.urandom(ENTRY_BYTES)
    began = time.process_time()
    for first in range(0, len(keys), COMMIT):
        batch = WriteBatch(raw_mode=True)
        for key in keys[first : first + COMMIT]:
            batch.put(key, value)
            if index:
                batch.put(key[:16], entry)
        db.write(batch, synced)
    spent = time.process_time() - began
    db.close()
    shutil.rmtree(where)
    return spent / len(keys) * 1e6


def main() -> None:
    """Print the minimum CPU per message, records alone and records with index entries."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    keys = _keys(args.messages, args.devices)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.rounds):
        for index in (False, True):
            best[index] = min(best[index], _cpu_per_message(keys, index))
    load = os.getloadavg()[0]
    print(f"records alone:            {best[False]:.2f} us of CPU per message (min)")
    print(f"records and index entries: {best[True]:.2f} us of CPU per message (min)")
    print(f"load average {load:.2f}; {args.messages} messages, {args.devices} devices")


if __name__ == "__main__":
    main()
