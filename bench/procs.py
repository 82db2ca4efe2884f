"""The processes a scenario runs: its own Mosquitto, the bridge, mosquitto_sub; and their meters.

Everything is observed from outside: CPU and memory from /proc/<pid>, the broker's queue from
its $SYS counters, the bridge's stored count from its metrics endpoint. Nothing runs inside the
process that is measured.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import wire
from tools import devbroker

STOCK_TEMPLATE = Path(__file__).resolve().parent / "stock.conf"
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """A scenario could not run; the message says what happened."""


# ---- /proc meters -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a live process: its peak resident set so far (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    """Current resident set of a live process (0 when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except OSError:
        return 0


@dataclass
class Sample:
    """One reading of the meters, at monotonic time t."""

    t: float
    cpu: dict[str, float]
    rss: dict[str, int]


class Sampler:
    """Reads CPU and RSS of named processes every `period` seconds, in a thread of the bench."""

    def __init__(
        self, pids: dict[str, int], period: float = 0.05, wal_dir: Path | None = None
    ) -> None:
        self.pids = pids
        self.period = period
        self.samples: list[Sample] = []
        # Growth of a RocksDB WAL file is a synced write: watching sizes costs the writer nothing.
        self.wal_dir = wal_dir
        self.wal_writes: list[float] = []
        self._wal_sizes: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench.sampler", daemon=True)

    def __enter__(self) -> Sampler:
        if self.wal_dir is not None:
            self._watch_wal(self.wal_dir)
            self.wal_writes.clear()  # what was there before is no news
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def take(self) -> Sample:
        """Read every meter now; a process that is gone keeps its last CPU reading."""
        last = self.samples[-1].cpu if self.samples else {}
        return Sample(
            time.monotonic(),
            {n: max(cpu_seconds(p), last.get(n, 0.0)) for n, p in list(self.pids.items())},
            {n: rss_bytes(p) for n, p in list(self.pids.items())},
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.take())
            if self.wal_dir is not None:
                self._watch_wal(self.wal_dir)
            self._stop.wait(self.period)

    def _watch_wal(self, root: Path) -> None:
        grew = False
        for path in root.rglob("*.log"):
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size > self._wal_sizes.get(path.name, 0):
                grew = True
            self._wal_sizes[path.name] = size
        if grew:
            self.wal_writes.append(time.monotonic())

    def at(self, t: float) -> Sample:
        """The sample nearest to monotonic time t."""
        return min(self.samples, key=lambda s: abs(s.t - t))

    def max_rss(self, name: str, since: float, until: float) -> int:
        """Largest resident set of one process seen between two times."""
        return max((s.rss[name] for s in self.samples if since <= s.t <= until), default=0)


# ---- the broker ---------------------------------------------------------------------------------


@dataclass
class Broker:
    """A Mosquitto of the bench: `stock` (defaults; queue raised, sys_interval 1) or ours."""

    conf: str
    state_dir: Path
    max_queued: int
    port: int = field(default_factory=devbroker.free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        """Render the config and start mosquitto on a free port."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.conf == "stock":
            text = devbroker.render_config(STOCK_TEMPLATE, self.port, self.state_dir)
            text += f"max_queued_messages {self.max_queued}\n"
        else:
            text = devbroker.render_config(
                devbroker.CONF_DIR / self.conf, self.port, self.state_dir
            )
            text += "\n# bench: $SYS counters every second\nsys_interval 1\n"
            text += f"max_queued_messages {max(self.max_queued, 1_000_000)}\n"
        conf_path = self.state_dir / "mosquitto.conf"
        conf_path.write_text(text, encoding="utf-8")
        log = (self.state_dir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(
            [devbroker.mosquitto_binary(), "-c", str(conf_path)], stdout=log, stderr=log
        )
        wire.wait_port(self.port)
        return self

    @property
    def pid(self) -> int:
        """The broker's process id."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        """The bridge's --broker value."""
        return f"mqtt://127.0.0.1:{self.port}"

    def client(self, client_id: str, clean_start: bool = True, expiry: int = 0) -> wire.Client:
        """A connected raw client."""
        return wire.Client(self.port).connect(client_id, clean_start, expiry)

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None:
            devbroker.stop(self.proc)
            self.proc = None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class SysWatch:
    """Follows $SYS counters of the broker: per topic, (monotonic time, value) pairs."""

    STORE = "$SYS/broker/store/messages/count"
    SUBSCRIPTIONS = "$SYS/broker/subscriptions/count"

    def __init__(self, broker: Broker, topics: Sequence[str] = (STORE, SUBSCRIPTIONS)) -> None:
        self.client = broker.client(f"bench-sys-{os.getpid()}-{time.monotonic_ns()}")
        self.client.sock.settimeout(0.2)
        self.topics = list(topics)
        self.values: dict[str, list[tuple[float, int]]] = {t: [] for t in topics}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench.syswatch", daemon=True)

    def __enter__(self) -> SysWatch:
        for topic in self.topics:
            self.client.subscribe(topic, qos=0)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.disconnect()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pkt in self.client.read():
                if pkt.kind == wire.PUBLISH:
                    topic, _, payload = wire.publish_parts(pkt)
                    self.values[topic].append((time.monotonic(), int(payload)))

    def latest(self, topic: str = STORE) -> int:
        """The last value seen (-1 before the first)."""
        seen = self.values[topic]
        return seen[-1][1] if seen else -1

    def wait(
        self, check: Callable[[int], bool], timeout: float, what: str, topic: str = STORE
    ) -> float:
        """Until a value (one already seen included) passes `check`; returns when it arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, value in list(self.values[topic]):
                if check(value):
                    return t
            time.sleep(0.05)
        raise BenchError(
            f"timed out after {timeout:.0f} s waiting for {what} ({self.latest(topic)})"
        )

    def settled(self, quiet: float, timeout: float, topic: str = STORE) -> int:
        """The value once it has not changed for `quiet` seconds (BenchError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = list(self.values[topic])
            if seen:
                value = seen[-1][1]
                changed = max((t for t, v in seen if v != value), default=0.0)
                if time.monotonic() - changed >= quiet:
                    return value
            time.sleep(0.1)
        raise BenchError(f"{topic} did not settle in {timeout:.0f} s ({self.latest(topic)})")

    def wait_after(
        self,
        since: float,
        check: Callable[[int], bool],
        timeout: float,
        what: str,
        topic: str = STORE,
    ) -> float:
        """Like wait(), counting only values that arrived after monotonic time `since`."""
        return self.wait_values(lambda t, v: t > since and check(v), timeout, what, topic)

    def wait_values(
        self, check: Callable[[float, int], bool], timeout: float, what: str, topic: str = STORE
    ) -> float:
        """Until a (time, value) pair passes `check`; returns its time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, value in list(self.values[topic]):
                if check(t, value):
                    return t
            time.sleep(0.05)
        raise BenchError(
            f"timed out after {timeout:.0f} s waiting for {what} ({self.latest(topic)})"
        )

    def subscribed(self, before: int, timeout: float = 10.0) -> None:
        """Until the broker counts more subscriptions than `before`."""
        self.wait(lambda v: v > before, timeout, "a subscription", self.SUBSCRIPTIONS)


# ---- the bridge ---------------------------------------------------------------------------------


# Every mqtt-backup process the bench starts runs from here, not from the bench's directory:
# `python -m` puts the working directory first on the import path, ahead of PYTHONPATH, so a
# `--bridge-command "env PYTHONPATH=<other tree> python -m mqtt_backup"` started in a source tree
# ran that tree's code, and an A/B of two trees compared one with itself.
PRODUCT_CWD = "/"


def with_absolute_paths(command: Sequence[str]) -> list[str]:
    """`command` with its relative paths made the caller's: the bridge runs from PRODUCT_CWD.

    What names something that exists from here is a path: each entry of `NAME=a:b`
    (`PYTHONPATH=other`: else resolved from / and silently dropped, and the installed tree ran
    instead), and a word with a slash (`.venv/bin/python`). `-m mqtt_backup` has no slash: it
    stays a module name even where a directory of that name exists.
    """

    def absolute(word: str, path_like: bool) -> str:
        if word.startswith("/") or not path_like or not Path(word).exists():
            return word
        return str(Path(word).resolve())

    result = []
    for word in command:
        name, eq, value = word.partition("=")
        if eq and name.isidentifier():
            entries = (absolute(v, path_like=bool(v)) for v in value.split(":"))
            result.append(name + "=" + ":".join(entries))
        else:
            result.append(absolute(word, path_like="/" in word or word in {".", ".."}))
    return result


def default_bridge_command() -> list[str]:
    """`python -m mqtt_backup` of this interpreter: the command before `run`."""
    return [sys.executable, "-m", "mqtt_backup"]


@dataclass
class BridgeSpec:
    """How to start the bridge being measured: a command and extra `run` options (a variant)."""

    name: str = "default"
    command: list[str] = field(default_factory=default_bridge_command)
    run_args: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, command: Sequence[str]) -> BridgeSpec:
        """`NAME` or `NAME:EXTRA RUN ARGS` (e.g. `paho:--transport paho`)."""
        name, _, extra = text.partition(":")
        return cls(name or "default", list(command), shlex.split(extra))


class Bridge:
    """One bridge process on a data directory, with metrics on a free port."""

    def __init__(
        self, spec: BridgeSpec, broker: Broker, data: Path, client_id: str, log: Path
    ) -> None:
        self.spec = spec
        self.broker = broker
        self.data = data
        self.client_id = client_id
        self.log = log
        self.metrics_port = devbroker.free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def argv(self) -> list[str]:
        """The full command line."""
        return [
            *self.spec.command,
            "run",
            "--broker",
            self.broker.url,
            "--data",
            str(self.data),
            "--client-id",
            self.client_id,
            "--metrics-port",
            str(self.metrics_port),
            "--log-level",
            "warning",
            *self.spec.run_args,
        ]

    def start(self) -> Bridge:
        """Start the process (it connects by itself)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_BACKUP_")}
        out = self.log.open("ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=out, env=env, cwd=PRODUCT_CWD)
        return self

    @property
    def pid(self) -> int:
        """The bridge's process id."""
        assert self.proc is not None
        return self.proc.pid

    def stored(self) -> int | None:
        """messages_stored from the metrics endpoint; None while it does not answer."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("mqtt_backup_messages_stored_total"):
                return int(float(line.split()[1]))
        return None

    def wait_stored(self, at_least: int, timeout: float = 60.0, period: float = 0.005) -> float:
        """Poll the stored count until it reaches `at_least`; returns the monotonic time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            got = self.stored()
            if got is not None and got >= at_least:
                return time.monotonic()
            time.sleep(period)
        raise BenchError(f"the bridge did not store {at_least} messages in {timeout:.0f} s")

    def check_alive(self) -> None:
        """BenchError with the log's tail when the bridge has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise BenchError(f"the bridge exited ({self.proc.returncode}): {' | '.join(tail)}")

    def stop(self) -> None:
        """SIGTERM (it stores and acks what it holds), then wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> float:
        """Kill -9; returns the monotonic time of the kill."""
        assert self.proc is not None
        self.proc.kill()
        killed = time.monotonic()
        self.proc.wait()
        self.proc = None
        return killed


# ---- mosquitto_sub ------------------------------------------------------------------------------


def mosquitto_sub(
    broker: Broker, client_id: str, topic: str, count: int, log: Path, persistent: bool = True
) -> subprocess.Popen[bytes]:
    """mosquitto_sub -q 1 that exits after `count` messages; output discarded, errors to log."""
    argv = ["mosquitto_sub", "-p", str(broker.port), "-h", "127.0.0.1", "-i", client_id]
    argv += ["-q", "1", "-t", topic, "-C", str(count), "-V", "mqttv5"]
    if persistent:
        argv += ["-c", "-x", "604800"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    _SUBSCRIBERS.append(proc)
    return proc


_SUBSCRIBERS: list[subprocess.Popen[bytes]] = []


def reap_subscribers() -> None:
    """Kill the mosquitto_sub processes of a scenario that are still waiting (it failed)."""
    while _SUBSCRIBERS:
        proc = _SUBSCRIBERS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def create_session(broker: Broker, client_id: str, topic: str) -> None:
    """Make the persistent session and subscription of a consumer that is then away."""
    client = broker.client(client_id, clean_start=False, expiry=604800)
    client.subscribe(topic, qos=1)
    client.disconnect()
