"""The fault suite's tools: a ledger of what the broker accepted, and the ways to compare with it.

A `Publisher` plays a device fleet: QoS 1, one payload `{"n": N}` per message with N counting per
device, and a message enters the ledger only once the broker acknowledged it (PUBACK). What the
bridge kept is read back twice, through `mqtt-backup export` of the data directory and through an
MQTT restore, and each is tallied against the ledger: lost (must be 0, or inside a recorded gap
the broker is to blame for), flagged redelivered copies (counted), unflagged copies (must be 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_backup.config import BrokerTarget, parse_broker_url
from mqtt_backup.restore.client import Ask, ask, request_for
from mqtt_backup.storage.journal import Gap
from tests.conftest import REPO, wait_until

SCALE = os.environ.get("FAULTS_SCALE", "small")
if SCALE not in ("small", "big"):
    raise RuntimeError(f"FAULTS_SCALE must be 'small' or 'big', not {SCALE!r}")


def size(small: int, big: int) -> int:
    """The small number under `make test`, the big one under `make faults`."""
    return big if SCALE == "big" else small


# A continuous publisher's pace: below what the bridge stores on this machine kind under load,
# so that a backlog built during a fault drains in bounded time.
RATE = size(500, 600)


# ---- the ledger -----------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the broker accepted, per device, in PUBACK order, with when it was sent and acked."""

    accepted: dict[str, list[int]] = field(default_factory=dict)
    window: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    uncertain: set[tuple[str, int]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, device: str, n: int, sent_ns: int) -> None:
        """The broker acknowledged message n of device."""
        with self.lock:
            self.accepted.setdefault(device, []).append(n)
            self.window[device, n] = (sent_ns, time.time_ns())

    def unsure(self, device: str, n: int) -> None:
        """The publish failed without a PUBACK: the broker may or may not have it."""
        with self.lock:
            self.uncertain.add((device, n))

    @property
    def total(self) -> int:
        """How many messages the broker acknowledged."""
        with self.lock:
            return sum(len(ns) for ns in self.accepted.values())

    def keys(self) -> set[tuple[str, int]]:
        """Every acknowledged (device, n)."""
        with self.lock:
            return {(d, n) for d, ns in self.accepted.items() for n in ns}


@dataclass(frozen=True)
class Copy:
    """One stored copy of a ledgered message, as export or restore showed it."""

    device: str
    n: int
    dup: bool


@dataclass
class Tally:
    """A read-back compared with the ledger."""

    accepted: int
    copies: int
    lost: list[tuple[str, int]]
    # flagged_dups counts copies with the DUP flag (a first copy can carry it too: the broker
    # had sent it to a connection that closed before storing it); extra_copies counts the
    # copies beyond one per message.
    flagged_dups: int
    extra_copies: int
    unflagged_dups: int
    unknown: int  # stored, not acknowledged: a publish that failed after the broker took it
    out_of_order: int

    def as_json(self) -> dict[str, int]:
        """The counts for the results file."""
        return {
            "accepted": self.accepted,
            "copies": self.copies,
            "lost": len(self.lost),
            "flagged_dups": self.flagged_dups,
            "extra_copies": self.extra_copies,
            "unflagged_dups": self.unflagged_dups,
            "unknown": self.unknown,
            "out_of_order": self.out_of_order,
        }


def tally(ledger: Ledger, copies: Sequence[Copy]) -> Tally:
    """Compare stored copies of the ledger's devices with what the broker accepted."""
    keys = ledger.keys()
    ours = [c for c in copies if c.device in ledger.accepted]
    seen = Counter((c.device, c.n) for c in ours)
    first = Counter((c.device, c.n) for c in ours if not c.dup)
    disorder = 0
    by_device: dict[str, list[int]] = {}
    for c in ours:
        if not c.dup:
            by_device.setdefault(c.device, []).append(c.n)
    for ns in by_device.values():
        disorder += sum(1 for a, b in itertools.pairwise(ns) if b < a)
    return Tally(
        accepted=len(keys),
        copies=len(ours),
        lost=sorted(k for k in keys if seen[k] == 0),
        flagged_dups=sum(1 for c in ours if c.dup),
        extra_copies=len(ours) - len(seen),
        unflagged_dups=sum(n - 1 for n in first.values() if n > 1),
        unknown=sum(1 for k in seen if k not in keys),
        out_of_order=disorder,
    )


def _copy(line: dict[str, Any]) -> Copy | None:
    if line.get("encoding") != "utf8":
        return None
    try:
        body = json.loads(line["payload"])  # text or bytes
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("n"), int):
        return None
    return Copy(line["device"], body["n"], bool(line.get("dup")))


def copies_of(lines: Iterable[str]) -> list[Copy]:
    """The ledgered copies among JSON lines of the export/restore shape."""
    out = []
    for text in lines:
        if text.strip():
            found = _copy(json.loads(text))
            if found is not None:
                out.append(found)
    return out


# ---- the fleet --------------------------------------------------------------------------------


class Publisher:
    """Devices publishing QoS 1 on their own thread until stopped, every PUBACK into the ledger.

    A failed publish is never retried with the same payload (a retry of a message the broker did
    take would be a duplicate the bridge could not flag); its number is marked uncertain and the
    publisher reconnects and goes on with the next one.
    """

    def __init__(
        self,
        port: int,
        devices: Sequence[str],
        *,
        limit: int | None = None,
        topic: str = "devices/{device}/t",
        expiry: int | None = None,
        ledger: Ledger | None = None,
        rate: float | None = None,
        pad: int = 0,
    ) -> None:
        self.port = port
        self.devices = list(devices)
        self.limit = limit
        self.topic = topic
        self.expiry = expiry
        self.rate = rate  # messages per second; None: as fast as the broker acknowledges
        self.pad = "x" * pad  # makes each payload about this much bigger
        self.ledger = ledger or Ledger()
        self.errors = 0
        self._stop = threading.Event()
        # A second publisher on the same ledger goes on numbering where the first one stopped.
        used = [*self.ledger.keys(), *self.ledger.uncertain]
        self._next = {d: 1 + max((n for dev, n in used if dev == d), default=-1) for d in devices}
        self._count = 0
        self._thread = threading.Thread(target=self._main, name="publisher", daemon=True)

    def start(self) -> Publisher:
        """Begin publishing."""
        self._thread.start()
        return self

    def stop(self) -> Ledger:
        """Stop and return the ledger."""
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the publisher did not stop"
        return self.ledger

    def wait_done(self, timeout: float = 300) -> Ledger:
        """Wait until `limit` messages were published (acknowledged or not), then stop."""
        assert self.limit is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the publisher did not finish in {timeout}s"
        return self.ledger

    def wait_accepted(self, count: int, timeout: float = 120) -> None:
        """Block until the ledger holds `count` messages more than now."""
        target = self.ledger.total + count
        wait_until(lambda: self.ledger.total >= target, timeout, f"{count} more PUBACKs")

    @property
    def attempted(self) -> int:
        """Publishes started so far."""
        return self._count

    def _main(self) -> None:
        asyncio.run(self._publish_all())

    def _done(self) -> bool:
        return self._stop.is_set() or (self.limit is not None and self.attempted >= self.limit)

    async def _publish_all(self) -> None:
        while not self._done():
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5, timeout=10
                ) as client:
                    await self._publish_some(client)
            except (aiomqtt.MqttError, OSError, TimeoutError):
                self.errors += 1
                await asyncio.sleep(0.2)

    async def _publish_some(self, client: aiomqtt.Client) -> None:
        props = None
        if self.expiry is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = self.expiry
        started, sent_before = time.monotonic(), self._count
        while not self._done():
            if self.rate is not None:
                due = started + (self._count - sent_before) / self.rate
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
            device = self.devices[self.attempted % len(self.devices)]
            n = self._next[device]
            self._next[device] = n + 1
            self._count += 1
            sent = time.time_ns()
            try:
                async with asyncio.timeout(10):
                    await client.publish(
                        self.topic.format(device=device),
                        json.dumps({"n": n, "pad": self.pad} if self.pad else {"n": n}).encode(),
                        qos=1,
                        properties=props,
                    )
            except BaseException:
                self.ledger.unsure(device, n)
                raise
            self.ledger.add(device, n, sent)


def fleet(unique: str, devices: int) -> list[str]:
    """Device ids of one test."""
    return [f"{unique}-d{i}" for i in range(devices)]


# ---- the bridge as a process ------------------------------------------------------------------


class BridgeProcess:
    """`python -m mqtt_backup run` as a subprocess: started, killed, stopped like in production."""

    def __init__(
        self, url: str, data: Path, log: Path, *args: str, prefix: Sequence[str] = ()
    ) -> None:
        self.url, self.data, self.log, self.args = url, data, log, args
        self.prefix = list(prefix)  # e.g. nsenter into a mount namespace
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> BridgeProcess:
        """Start, and wait until it said it runs (and its restore side listens)."""
        cmd = [*self.prefix, sys.executable, "-m", "mqtt_backup", "run", "--broker", self.url]
        cmd += ["--data", str(self.data), "--partitions", "3", "--batch-max", "50"]
        cmd += ["--batch-ms", "10", *self.args]
        marker = self._runs()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=REPO)
        self.starts += 1
        if wait:
            wait_until(lambda: self._runs() > marker, 30, "the bridge to start")
        return self

    def _runs(self) -> int:
        if self.proc is not None and self.proc.poll() is not None and self.proc.returncode != 0:
            raise AssertionError(f"the bridge exited {self.proc.returncode}:\n{self.text()}")
        return self.text().count("restore service listening")

    def text(self) -> str:
        """The bridge's log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """kill -9: no flush, no acks, no goodbye."""
        assert self.proc is not None
        self.proc.kill()
        assert self.proc.wait(10) == -signal.SIGKILL
        self.proc = None

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM: store what is pending, ack, disconnect; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def close(self) -> None:
        """Kill what is still running (test teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@contextlib.contextmanager
def bridge_process(
    url: str, data: Path, log: Path, *args: str, prefix: Sequence[str] = ()
) -> Iterator[BridgeProcess]:
    """A BridgeProcess that is killed at the end whatever happens."""
    bridge = BridgeProcess(url, data, log, *args, prefix=prefix)
    try:
        yield bridge
    finally:
        bridge.close()


# ---- reading back -----------------------------------------------------------------------------


def cli(
    *args: str, timeout: float = 300, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """`python -m mqtt_backup ARGS`, output captured."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "mqtt_backup", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


def exported(data: Path, prefix: Sequence[str] = ()) -> list[Copy]:
    """Every ledgered copy `mqtt-backup export` writes for the data directory."""
    done = cli("export", "--data", str(data), prefix=prefix)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return copies_of(done.stdout.splitlines())


@dataclass
class Restored:
    """What an MQTT restore of some devices returned, and each one's terminal message."""

    copies: list[Copy]
    terminals: list[dict[str, Any]]

    @property
    def complete(self) -> bool:
        """Every terminal said done and complete."""
        return all(t.get("done") and t.get("complete") for t in self.terminals)

    @property
    def answered(self) -> bool:
        """Every terminal said done (not error)."""
        return all(t.get("done") for t in self.terminals)


def restored(url: str, devices: Sequence[str]) -> Restored:
    """Restore each device over MQTT through the running bridge, with the client of
    `mqtt-backup restore` (mqtt_backup.restore.client), in this process."""
    result = Restored([], [])
    for device in devices:
        lines: list[dict[str, Any]] = []
        question = Ask(BrokerTarget(parse_broker_url(url)), request_for(device, {}), timeout=30)
        end = asyncio.run(ask(question, lines.append))
        result.terminals.append({**end, "lines": len(lines)})
        result.copies += [c for c in map(_copy, lines) if c is not None]
    return result


def terminal(url: str, device: str, **fields: Any) -> dict[str, Any]:
    """The terminal message of an MQTT restore request (done with count/complete/gaps, or error)."""
    question = Ask(BrokerTarget(parse_broker_url(url)), request_for(device, fields), timeout=30)
    return asyncio.run(ask(question, lambda _body: None))


def stored_total(data: Path, devices: Sequence[str]) -> int:
    """How many copies of these devices the index counts (0 before the store exists)."""
    from mqtt_backup.storage import StoreReader  # noqa: PLC0415 - tests/conftest does the same

    try:
        with StoreReader(data) as reader:
            return sum(d.count for d in reader.devices() if d.device in devices)
    except Exception:  # noqa: BLE001 - not created yet, or mid-creation
        return 0


def wait_stored(data: Path, ledger: Ledger, timeout: float = size(120, 900)) -> None:
    """Wait until every message of the ledger has a stored copy.

    The index count comes first (cheap); it counts redelivered copies too, so it can reach the
    ledger's size early: then each device's history is read to be sure.
    """
    devices, want = list(ledger.accepted), ledger.total
    wait_until(lambda: stored_total(data, devices) >= want, timeout, f"{want} stored messages")
    wait_until(lambda: not missing(data, ledger), timeout, "every ledgered message stored")


def missing(data: Path, ledger: Ledger) -> set[tuple[str, int]]:
    """Ledgered messages without a stored copy (read in this process)."""
    from mqtt_backup.storage import StoreReader  # noqa: PLC0415 - tests/conftest does the same

    have: set[tuple[str, int]] = set()
    with StoreReader(data) as reader:
        for device in ledger.accepted:
            for m in reader.messages(device):
                found = _copy({"device": device, "encoding": "utf8", "payload": m.record.payload})
                if found is not None:
                    have.add((found.device, found.n))
    return ledger.keys() - have


# ---- a network between bridge and broker ------------------------------------------------------


class Proxy:
    """A loopback TCP proxy in front of the broker that can cut or blackhole the connections.

    `drop()` resets every open connection and refuses new ones; `blackhole()` keeps them open but
    forwards nothing either way (a dead route: only keepalive can notice); `heal()` restores both.
    """

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._mode = "pass"
        self._flowing = threading.Event()
        self._flowing.set()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.connections = 0
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    @property
    def url(self) -> str:
        """The --broker URL that goes through the proxy."""
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._mode == "drop":
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # a blackhole holds what was read, too
                sink.sendall(data)
        except OSError:
            pass
        if self._mode == "drop":
            return  # drop() resets both sides
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        """Reset every connection (RST) and refuse new ones until heal()."""
        self._mode = "drop"
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _reset(sock)

    def blackhole(self) -> None:
        """Stop forwarding in both directions; connections stay open."""
        self._mode = "blackhole"
        self._flowing.clear()

    def heal(self) -> None:
        """Forward again."""
        self._mode = "pass"
        self._flowing.set()

    def close(self) -> None:
        """Stop accepting and close everything."""
        self._closed = True
        self._flowing.set()
        self._server.close()
        self.drop()


def _reset(sock: socket.socket) -> None:
    # Linger 0 makes the close a reset (RST). A close alone would not reach a socket that a pump
    # thread is blocked reading: shutting the read side first wakes that thread up.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


# ---- the verdict ------------------------------------------------------------------------------


@dataclass
class ReadBack:
    """The ledger compared with export and with an MQTT restore."""

    export: Tally
    restore: Tally
    restored: Restored


def read_back(ledger: Ledger, data: Path, url: str) -> ReadBack:
    """Wait for the store to catch up, then restore over MQTT (bridge running) and export."""
    wait_stored(data, ledger)
    got = restored(url, list(ledger.accepted))
    return ReadBack(tally(ledger, exported(data)), tally(ledger, got.copies), got)


def assert_nothing_lost(back: ReadBack) -> None:
    """Lost 0, no unflagged copy, per-device order kept, in export and restore alike."""
    assert back.restored.answered, back.restored.terminals
    short = [t for t in back.restored.terminals if t["count"] != t["lines"]]
    assert short == [], f"the restore client wrote fewer lines than the bridge sent: {short}"
    assert back.restore.copies == back.export.copies, (
        f"the bridge's restore sent {back.restore.copies} copies, export has "
        f"{back.export.copies}: the restore service reads a stale view"
    )
    for name, t in (("export", back.export), ("restore", back.restore)):
        assert t.lost == [], f"{name}: {len(t.lost)} acknowledged messages lost, e.g. {t.lost[:5]}"
        assert t.unflagged_dups == 0, f"{name}: {t.unflagged_dups} copies without the DUP flag"
        assert t.out_of_order == 0, f"{name}: per-device order broken {t.out_of_order} times"


def uncovered(ledger: Ledger, lost: Sequence[tuple[str, int]], gaps: Sequence[Gap]) -> list[Any]:
    """Lost messages whose publish window [sent, acked] lies inside no recorded gap."""
    return [
        key
        for key in lost
        if not any(
            g.since_ns <= ledger.window[key][0] and ledger.window[key][1] <= g.until_ns
            for g in gaps
        )
    ]


def marker(port: int, devices: Sequence[str], ledger: Ledger) -> int:
    """Publish one more message per device into the ledger; returns when it started.

    A queue is delivered in order, so once these are stored, all the broker had before them is.
    """
    started = time.time_ns()
    Publisher(port, devices, limit=len(devices), ledger=ledger).start().wait_done()
    return started


def wait_markers(data: Path, ledger: Ledger, since_ns: int, timeout: float = 60) -> None:
    """Wait until each device's last ledgered message (its marker) is stored."""
    from mqtt_backup.storage import StoreReader  # noqa: PLC0415 - tests/conftest does the same

    want = {d: max(ns) for d, ns in ledger.accepted.items()}

    def stored() -> bool:
        try:
            with StoreReader(data) as reader:
                for device, n in want.items():
                    recent = reader.messages(device, since_ns, None, None)
                    if not any(json.loads(m.record.payload) == {"n": n} for m in recent):
                        return False
        except Exception:  # noqa: BLE001 - not created yet
            return False
        return True

    wait_until(stored, timeout, "the marker messages")


def above(read: Callable[[], int], level: int) -> Callable[[], bool]:
    """A wait_until check: `read()` has risen above `level`."""
    return lambda: read() > level
