"""Run the bridge against third-party brokers and print what held (`make brokers`).

Mosquitto is the system binary; aedes comes from npm into `.run/brokers/aedes` and amqtt from PyPI
into its own venv `.run/brokers/amqtt-venv` (never the project's). Each scenario starts a fresh
broker and a fresh data directory, publishes numbered QoS 1 messages with a paho client of its own,
keeps a ledger of what the broker acknowledged (PUBACK), and compares the ledger with
`mqtt-backup export`: lost, extra copies (flagged `dup` or not), per-device order, retain flags,
recorded gaps, and a restore round trip over MQTT. Not part of `make test`: it needs npm and PyPI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tools import devbroker

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run" / "brokers"
BRIDGE = ROOT / ".venv" / "bin" / "mqtt-backup"
AEDES_DIR = RUN / "aedes"
AMQTT_VENV = RUN / "amqtt-venv"
AEDES_VERSION = "1.2.0"
AMQTT_VERSION = "0.12.1"
DEVICES = 4


class MatrixError(RuntimeError):
    """A broker, the bridge or an install step did not do what the matrix needs."""


# ---- brokers -------------------------------------------------------------------------------


@dataclass
class Target:
    """One broker kind and how the bridge talks to it."""

    name: str
    kind: str  # mosquitto | aedes | amqtt
    protocol: str
    username: str | None = None
    anonymous: bool = True

    def url(self, port: int) -> str:
        """The broker URL for the bridge and the restore client."""
        user = f"{self.username}@" if self.username else ""
        return f"mqtt://{user}127.0.0.1:{port}"


TARGETS = {
    "mosquitto-5": Target("mosquitto-5", "mosquitto", "5"),
    "mosquitto-3.1.1": Target("mosquitto-3.1.1", "mosquitto", "3.1.1"),
    "aedes": Target("aedes", "aedes", "3.1.1"),
    "amqtt-anon": Target("amqtt-anon", "amqtt", "3.1.1"),
    "amqtt-auth": Target("amqtt-auth", "amqtt", "3.1.1", username="bridge", anonymous=False),
}


class Broker:
    """A broker process on a free port with its state in `state_dir`; restartable."""

    def __init__(self, target: Target, state_dir: Path) -> None:
        self.target = target
        self.state_dir = state_dir
        self.port = devbroker.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the broker and wait until its port accepts connections."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.target.kind == "mosquitto":
            self.proc = devbroker.start("dev.conf", self.port, self.state_dir)
            return
        log = (self.state_dir / "broker.log").open("ab")
        self.proc = subprocess.Popen(
            self._command(), cwd=self.state_dir, stdout=log, stderr=subprocess.STDOUT
        )
        wait_until(lambda: devbroker.port_open(self.port), 30, f"{self.target.kind} port")

    def _command(self) -> list[str]:
        if self.target.kind == "aedes":
            script = AEDES_DIR / "aedes_broker.mjs"
            shutil.copyfile(ROOT / "tools" / "aedes_broker.mjs", script)
            return ["node", str(script), str(self.port)]
        conf = self.state_dir / "amqtt.yaml"
        conf.write_text(amqtt_config(self.port, anonymous=self.target.anonymous), encoding="utf-8")
        return [str(AMQTT_VENV / "bin" / "amqtt"), "-c", str(conf)]

    def stop(self) -> None:
        """SIGTERM, as an operator would (Mosquitto saves its persistence file)."""
        if self.proc is not None:
            devbroker.stop(self.proc)
            self.proc = None


def amqtt_config(port: int, *, anonymous: bool) -> str:
    """An amqtt broker config: one listener; anonymous allowed or a username required."""
    allow = "true" if anonymous else "false"
    return (
        "listeners:\n  default:\n    type: tcp\n"
        f"    bind: 127.0.0.1:{port}\n"
        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
        f"    allow_anonymous: {allow}\n"
    )


# ---- the bridge ----------------------------------------------------------------------------


class Bridge:
    """`mqtt-backup run` as a child process on one data directory."""

    def __init__(self, target: Target, port: int, data: Path) -> None:
        self.target = target
        self.port = port
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def command(self, *args: str) -> list[str]:
        """A mqtt-backup command line with this bridge's connection options."""
        return [str(BRIDGE), *args]

    def start(self) -> None:
        """Start the bridge; `ready` waits until it stores."""
        self.starts += 1
        log = (self.data.parent / "bridge.log").open("ab")
        self.proc = subprocess.Popen(
            self.command(
                "run",
                "--broker",
                self.target.url(self.port),
                "--data",
                str(self.data),
                "--protocol",
                self.target.protocol,
                "--partitions",
                "2",
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            start_new_session=True,
        )

    def signal(self, signum: signal.Signals) -> None:
        """Send a signal to the running bridge."""
        if self.proc is not None:
            self.proc.send_signal(signum)

    def kill(self) -> None:
        """Kill the bridge with SIGKILL."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        """SIGTERM: the bridge stores and acknowledges what it holds, then disconnects."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def export(self) -> list[dict[str, object]]:
        """Every stored record, as `export --format jsonl` writes it."""
        if not (self.data / "manifest.json").exists():
            return []
        out = subprocess.run(
            self.command("export", "--data", str(self.data), "--format", "jsonl"),
            capture_output=True,
            check=False,
            env=clean_env(),
        )
        if out.returncode != 0:
            return []
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def gaps(self) -> list[str]:
        """The reasons of the gaps the bridge recorded."""
        path = self.data / "gaps.jsonl"
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        return [str(json.loads(line).get("reason")) for line in lines if line.strip()]


def clean_env() -> dict[str, str]:
    """The environment without MQTT_BACKUP_* settings that would change the bridge."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MQTT_BACKUP_")}


# ---- the publisher and its ledger ----------------------------------------------------------


@dataclass
class Ledger:
    """What the broker acknowledged: (topic, payload) of every PUBACKed message."""

    acked: set[tuple[str, str]] = field(default_factory=set)
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Publisher:
    """A paho MQTT 3.1.1 client publishing numbered QoS 1 messages, ledger kept on PUBACK."""

    def __init__(self, target: Target, port: int, name: str) -> None:
        self.ledger = Ledger()
        self._pending: dict[int, tuple[str, str]] = {}
        self._early: set[int] = set()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311
        )
        if not target.anonymous:
            self.client.username_pw_set("publisher")
        self.client.max_inflight_messages_set(100)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: object,
        mid: int,
        _reason: object,
        _props: object,
    ) -> None:
        with self.ledger.lock:
            message = self._pending.pop(mid, None)
            if message is None:
                self._early.add(mid)  # PUBACK before publish() returned its mid
            else:
                self.ledger.acked.add(message)

    def publish(self, topic: str, payload: str, *, retain: bool = False) -> None:
        """Publish one QoS 1 message; it enters the ledger when the broker acknowledges it."""
        # Not under the ledger lock: paho calls on_publish holding its own lock (deadlock).
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self.ledger.lock:
            self.ledger.sent += 1
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.ledger.acked.add((topic, payload))
            else:
                self._pending[info.mid] = (topic, payload)

    def numbered(self, first: int, count: int, rate: float = 0) -> None:
        """Messages first..first+count-1 over DEVICES devices; `rate` msg/s (0: flat out)."""
        start = time.monotonic()
        for n in range(first, first + count):
            device = f"m-{n % DEVICES}"
            self.publish(f"devices/{device}/seq", f"{device}:{n}")
            if rate:
                ahead = start + (n - first + 1) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

    def settle(self, timeout: float = 60) -> None:
        """Wait until every publish has its PUBACK (or the timeout)."""
        with suppress(MatrixError):
            wait_until(lambda: not self._pending, timeout, "PUBACKs")

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` until true; MatrixError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise MatrixError(f"timed out waiting for {what}")
        time.sleep(0.2)


# ---- one scenario run ----------------------------------------------------------------------


@dataclass
class Result:
    """What one scenario saw on one broker."""

    target: str
    scenario: str
    acked: int = 0
    stored: int = 0
    lost: int = 0
    copies_flagged: int = 0
    copies_unflagged: int = 0
    dup_flagged: int = 0
    inversions: int = 0
    false_retain: int = 0
    retained_probe: str = "-"
    gaps: str = "-"
    restore: str = "-"
    notes: list[str] = field(default_factory=list)


@dataclass
class Run:
    """The parts of one scenario: broker, bridge, publisher, where their files go."""

    target: Target
    broker: Broker
    bridge: Bridge
    publisher: Publisher
    result: Result


@contextmanager
def scenario_run(target: Target, scenario: str, workdir: Path) -> Iterator[Run]:
    """Fresh broker, data dir and publisher; everything stopped on the way out."""
    where = workdir / target.name / scenario
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    broker = Broker(target, where / "broker")
    broker.start()
    bridge = Bridge(target, broker.port, where / "data")
    publisher = None
    try:
        publisher = Publisher(target, broker.port, f"matrix-pub-{os.getpid()}")
        yield Run(target, broker, bridge, publisher, Result(target.name, scenario))
    finally:
        bridge.stop()
        if publisher is not None:
            publisher.close()
        broker.stop()


def ready(run: Run, timeout: float = 30) -> None:
    """Start the bridge and wait until a probe message is stored (so it has subscribed)."""
    run.bridge.start()
    token = f"probe-{run.bridge.starts}"
    publish_at = [0.0]

    def stored() -> bool:
        if time.monotonic() - publish_at[0] > 1:
            run.publisher.publish("devices/probe/ready", token)
            publish_at[0] = time.monotonic()
        return any(r.get("payload") == token for r in run.bridge.export())

    wait_until(stored, timeout, "the bridge to store a probe")


def drain(run: Run, quiet: float = 6, timeout: float = 120) -> list[dict[str, object]]:
    """Wait until the ledger is stored, or nothing new arrives for `quiet` seconds."""
    run.publisher.settle()
    deadline = time.monotonic() + timeout
    last_count, last_change = -1, time.monotonic()
    records: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        records = run.bridge.export()
        keys = {(str(r["topic"]), str(r["payload"])) for r in records}
        if run.publisher.ledger.acked <= keys:
            return records
        if len(records) != last_count:
            last_count, last_change = len(records), time.monotonic()
        elif time.monotonic() - last_change > quiet:
            return records
        time.sleep(0.5)
    return records


def compare(run: Run, records: list[dict[str, object]]) -> None:
    """Fill the result from the ledger and the stored records."""
    res, ledger = run.result, run.publisher.ledger.acked
    numbered = [r for r in records if str(r["topic"]).endswith("/seq")]
    seen: dict[tuple[str, str], int] = {}
    last: dict[str, int] = {}
    for rec in numbered:
        res.dup_flagged += bool(rec.get("dup"))
        key = (str(rec["topic"]), str(rec["payload"]))
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            res.copies_flagged += bool(rec.get("dup"))
            res.copies_unflagged += not rec.get("dup")
            continue
        device, n = str(rec["device"]), int(str(rec["payload"]).split(":")[1])
        res.inversions += n < last.get(device, -1)
        last[device] = max(n, last.get(device, -1))
        res.false_retain += bool(rec.get("retain"))
    res.acked = len({k for k in ledger if k[0].endswith("/seq")})
    res.stored = len(seen)
    res.lost = len({k for k in ledger if k[0].endswith("/seq")} - seen.keys())
    res.gaps = ",".join(run.bridge.gaps()) or "none"
    probes = [r for r in records if str(r["topic"]).startswith("devices/ret/")]
    if probes:
        res.retained_probe = f"retain={str(bool(probes[0].get('retain'))).lower()}"
    elif res.retained_probe == "sent":
        res.retained_probe = "not stored"


def restore_round_trip(run: Run, device: str = "m-0") -> None:
    """`mqtt-backup restore` over the broker must give what `export` gives; replay is tried too."""
    base = ["--broker", run.target.url(run.broker.port), "--protocol", run.target.protocol]
    out = subprocess.run(
        run.bridge.command("restore", device, *base, "--timeout", "10"),
        capture_output=True,
        check=False,
        env=clean_env(),
    )
    exported = subprocess.run(
        run.bridge.command("export", "--data", str(run.bridge.data), "--device", device),
        capture_output=True,
        check=False,
        env=clean_env(),
    )
    same = sorted(out.stdout.splitlines()) == sorted(exported.stdout.splitlines())
    lines = len(out.stdout.splitlines())
    run.result.restore = f"exit {out.returncode}, {lines} lines, {'=' if same else '!='} export"
    replay = subprocess.run(
        run.bridge.command("restore", device, *base, "--replay", "--timeout", "10"),
        capture_output=True,
        check=False,
        env=clean_env(),
    )
    first = (replay.stderr.decode(errors="replace").strip().splitlines() or [""])[-1]
    run.result.notes.append(f"replay: exit {replay.returncode} ({first[:90]})")


# ---- scenarios -----------------------------------------------------------------------------


def live(run: Run, n: int) -> None:
    """Bridge up; N messages and one retained message; restore round trip."""
    ready(run)
    run.publisher.publish("devices/ret/live", "retained-live", retain=True)
    run.result.retained_probe = "sent"
    run.publisher.numbered(0, n)
    compare(run, drain(run))
    restore_round_trip(run)


def offline(run: Run, n: int) -> None:
    """The bridge subscribes, stops (SIGTERM); N messages and a retained one queue; it returns."""
    ready(run)
    run.bridge.stop()
    run.publisher.publish("devices/ret/queued", "retained-queued", retain=True)
    run.result.retained_probe = "sent"
    run.publisher.numbered(0, n)
    run.publisher.settle()
    ready(run)
    compare(run, drain(run))


def backlog_live(run: Run, n: int) -> None:
    """N messages queue while the bridge is away; as it returns, N more arrive live."""
    ready(run)
    run.bridge.stop()
    run.publisher.numbered(0, n)
    run.publisher.settle()
    run.bridge.start()
    run.publisher.numbered(n, n, rate=2000)
    compare(run, drain(run))


def kill9(run: Run, n: int, kills: int = 3) -> None:
    """Kill -9 the bridge `kills` times during a paced, ledgered publish; restart each time."""
    ready(run)
    sender = threading.Thread(target=run.publisher.numbered, args=(0, n, n / 6))
    sender.start()
    for _ in range(kills):
        time.sleep(6 / (kills + 1))
        run.bridge.kill()
        run.bridge.start()
    sender.join()
    compare(run, drain(run))


def frozen_kill9(run: Run, n: int) -> None:
    """The bridge stops reading (SIGSTOP) with messages in flight, then is killed and restarted.

    Everything the broker sent meanwhile is unacknowledged and unstored: the broker must send it
    again, with the DUP flag, on the new connection.
    """
    ready(run)
    sender = threading.Thread(target=run.publisher.numbered, args=(0, n, n / 4))
    sender.start()
    time.sleep(1)
    run.bridge.signal(signal.SIGSTOP)
    time.sleep(2)
    run.bridge.kill()
    run.bridge.start()
    sender.join()
    compare(run, drain(run))


def stall(run: Run, n: int, seconds: float = 8) -> None:
    """The bridge stops acknowledging for `seconds` (SIGSTOP) during a paced publish."""
    ready(run)
    sender = threading.Thread(target=run.publisher.numbered, args=(0, n, n / 6))
    sender.start()
    time.sleep(1)
    run.bridge.signal(signal.SIGSTOP)
    time.sleep(seconds)
    run.bridge.signal(signal.SIGCONT)
    sender.join()
    compare(run, drain(run))


def broker_restart(run: Run, n: int) -> None:
    """N messages queue while the bridge is away; the broker restarts (SIGTERM) meanwhile."""
    ready(run)
    run.bridge.stop()
    run.publisher.numbered(0, n)
    run.publisher.settle()
    run.publisher.close()
    run.broker.stop()
    run.broker.start()
    ledger = run.publisher.ledger
    run.publisher = Publisher(run.target, run.broker.port, f"matrix-pub2-{os.getpid()}")
    run.publisher.ledger.acked |= ledger.acked
    ready(run)
    compare(run, drain(run))


SCENARIOS: dict[str, Callable[[Run, int], None]] = {
    "live": live,
    "offline": offline,
    "backlog+live": backlog_live,
    "kill-9": kill9,
    "frozen+kill-9": frozen_kill9,
    "stall-8s": stall,
    "broker-restart": broker_restart,
}


# ---- installs, versions, the table ---------------------------------------------------------


def install() -> None:
    """Install aedes (npm) and amqtt (its own venv) under .run/brokers; idempotent."""
    RUN.mkdir(parents=True, exist_ok=True)
    if not (AEDES_DIR / "node_modules" / "aedes" / "package.json").exists():
        AEDES_DIR.mkdir(parents=True, exist_ok=True)
        (AEDES_DIR / "package.json").write_text('{"private": true}\n', encoding="utf-8")
        npm = ["npm", "install", "--no-audit", "--no-fund", f"aedes@{AEDES_VERSION}"]
        subprocess.run(npm, cwd=AEDES_DIR, check=True, stdout=subprocess.DEVNULL)
    if not (AMQTT_VENV / "bin" / "amqtt").exists():
        subprocess.run([sys.executable, "-m", "venv", str(AMQTT_VENV)], check=True)
        pip = [str(AMQTT_VENV / "bin" / "pip"), "install", "--quiet", f"amqtt=={AMQTT_VERSION}"]
        subprocess.run(pip, check=True)


def versions() -> dict[str, str]:
    """The versions the figures were measured with."""

    def first_line(cmd: list[str]) -> str:
        out = subprocess.run(cmd, capture_output=True, check=False, text=True)
        return (out.stdout + out.stderr).strip().splitlines()[0]

    aedes_pkg = AEDES_DIR / "node_modules" / "aedes" / "package.json"
    amqtt_ver = [str(AMQTT_VENV / "bin" / "python"), "-c", "import amqtt; print(amqtt.__version__)"]
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "mqtt-backup": first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "mosquitto": first_line([devbroker.mosquitto_binary(), "-h"]),
        "aedes": json.loads(aedes_pkg.read_text(encoding="utf-8"))["version"],
        "node": first_line(["node", "--version"]),
        "amqtt": first_line(amqtt_ver),
    }


COLUMNS = [
    ("broker", "target"),
    ("scenario", "scenario"),
    ("acked", "acked"),
    ("stored", "stored"),
    ("lost", "lost"),
    ("copies dup", "copies_flagged"),
    ("copies no-dup", "copies_unflagged"),
    ("records dup=true", "dup_flagged"),
    ("order inversions", "inversions"),
    ("retain on non-retained", "false_retain"),
    ("retained probe", "retained_probe"),
    ("gaps", "gaps"),
    ("restore", "restore"),
]


def table(results: list[Result]) -> str:
    """A Markdown table of the results, then the notes."""
    head = "| " + " | ".join(title for title, _ in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    rows = ["| " + " | ".join(str(getattr(r, attr)) for _, attr in COLUMNS) + " |" for r in results]
    notes = [f"- {r.target} {r.scenario}: {note}" for r in results for note in r.notes]
    return "\n".join([head, rule, *rows, "", *notes])


def run_one(target: Target, scenario: str, n: int, workdir: Path) -> Result:
    """One scenario on one broker; a failure becomes a note, not a crash of the matrix."""
    with scenario_run(target, scenario, workdir) as run:
        try:
            SCENARIOS[scenario](run, n)
        except MatrixError as exc:
            run.result.notes.append(f"did not finish: {exc}")
            compare(run, run.bridge.export())
        return run.result


def main() -> int:
    """Install, run the chosen scenarios on the chosen brokers, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", default=",".join(TARGETS), help="comma-separated")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument("-n", type=int, default=1000, help="numbered messages per scenario")
    parser.add_argument("--json", type=Path, default=RUN / "results.json")
    args = parser.parse_args()
    targets = [TARGETS[name] for name in args.brokers.split(",")]
    scenarios = args.scenarios.split(",")
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]}; choose from {', '.join(SCENARIOS)}")
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so brokers and bridges are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    install()
    info = versions()
    print(" · ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    results: list[Result] = []
    for target in targets:
        for scenario in scenarios:
            result = run_one(target, scenario, args.n, RUN / "work")
            results.append(result)
            print(table([result]).splitlines()[2], flush=True)
    print(f"\n{table(results)}")
    rows = [r.__dict__ for r in results]
    args.json.write_text(json.dumps({"versions": info, "results": rows}, indent=1), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
