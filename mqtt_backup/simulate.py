"""A simulated device fleet behind `mqtt-backup simulate`: a demo, and a load generator.

`run_fleet(FleetSpec(...))` opens one MQTT connection and publishes for `devices` devices
(`{prefix}-0000`, `{prefix}-0001`, ...), round-robin, `rate` messages per second for the whole
fleet, each due at `start + k / rate` so they spread evenly over every second, not in bursts.
Up to WINDOW publishes await their PUBACK at once, so the rate is not bound by one round trip per
message; a fleet that falls more than _MAX_LAG_S behind (a slow broker) drops that backlog rather
than bursting it. The report counts what the broker acknowledged (QoS 1) or took (QoS 0).

Each device keeps one shape, chosen by its index (`SHAPES[i % 4]`), with slowly drifting readings:

- `telemetry`: `devices/{id}/telemetry`, JSON `{"ts", "temp_c", "humidity", "battery", "seq"}`;
  these devices also publish `devices/{id}/status` `{"online": true, "fw": ...}` once at start,
  retained (`FleetSpec.status_topics`).
- `raw`: `devices/{id}/raw`, RAW_FORMAT packed little-endian; the first byte RAW_MAGIC makes every
  payload invalid UTF-8, as binary sensor frames are.
- `tasmota`: `tele/{id}/SENSOR`, Tasmota-like JSON with a nested `ENERGY` object.
- `zigbee2mqtt`: `zigbee2mqtt/{id}`, JSON with `linkquality`, `contact`, `battery`, `voltage`.

The bridge's default template `devices/{device}/#` stores the first two shapes; the others need
`--topic 'tele/{device}/+' --topic 'zigbee2mqtt/{device}'`. `FleetSpec.topics_for_bridge` lists
every template a fleet needs, so a fleet of one or two devices needs only the default.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import struct
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from mqtt_backup.config import BrokerTarget
from mqtt_backup.errors import UsageError
from mqtt_backup.mqtt import AsyncConnection, Window

SHAPES: Final = ("telemetry", "raw", "tasmota", "zigbee2mqtt")
_TEMPLATES: Final = {
    "telemetry": "devices/{device}/#",
    "raw": "devices/{device}/#",
    "tasmota": "tele/{device}/+",
    "zigbee2mqtt": "zigbee2mqtt/{device}",
}
WINDOW: Final = 32
FIRMWARE: Final = "1.4.2"
# magic, version, seq (u32), ts in ms (u64), temp in 0.01 degC (i16), humidity in 0.01 % (u16),
# battery % (u8). 0xA5 is a UTF-8 continuation byte, so no payload decodes as text.
RAW_FORMAT: Final = "<BBIQhHB"
RAW_MAGIC: Final = 0xA5
RAW_VERSION: Final = 1
_STATUS: Final = "status"
_MAX_LAG_S: Final = 0.25
_PROGRESS_EVERY_S: Final = 1.0
# Below a millisecond a sleep costs more than it spaces: publish the few due messages together.
_MIN_SLEEP_S: Final = 0.001


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """What to simulate; a spec that cannot run raises UsageError naming the option to fix."""

    target: BrokerTarget
    devices: int
    rate: float
    duration: float
    prefix: str = "sim"
    qos: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        """Check every field once, so a FleetSpec that exists can run."""
        _check_spec(self)

    def device_id(self, index: int) -> str:
        """The id of device `index` (also the device level of its topics)."""
        return f"{self.prefix}-{index:04d}"

    @property
    def shapes(self) -> tuple[str, ...]:
        """The shapes this fleet publishes, in SHAPES order."""
        return SHAPES[: min(self.devices, len(SHAPES))]

    @property
    def topics_for_bridge(self) -> tuple[str, ...]:
        """The bridge's `--topic` templates that store every message of this fleet."""
        return tuple(dict.fromkeys(_TEMPLATES[shape] for shape in self.shapes))

    @property
    def status_topics(self) -> tuple[str, ...]:
        """The retained status topics the fleet publishes at start (one per telemetry device)."""
        return tuple(
            f"devices/{self.device_id(i)}/status"
            for i in range(self.devices)
            if _shape_of(i) == "telemetry"
        )


@dataclass(frozen=True, slots=True)
class FleetProgress:
    """Published so far (acknowledged), seconds since the first paced message, recent rate."""

    published: int
    elapsed: float
    rate: float


@dataclass(frozen=True, slots=True)
class FleetReport:
    """What the broker acknowledged: paced messages in all and per shape, and retained statuses.

    A bridge running throughout stores `published + retained` messages of this fleet.
    """

    published: int
    per_shape: Mapping[str, int]
    retained: int
    devices: int
    elapsed: float
    topics_for_bridge: tuple[str, ...]

    @property
    def rate(self) -> float:
        """Paced messages per second over the run."""
        return self.published / self.elapsed if self.elapsed > 0 else 0.0


def _check_spec(spec: FleetSpec) -> None:
    checks = (
        (spec.devices >= 1, f"--devices must be at least 1, got {spec.devices}", "--devices 20"),
        (
            math.isfinite(spec.rate) and spec.rate > 0,
            f"--rate must be a positive number of messages per second, got {spec.rate}",
            "--rate 50",
        ),
        (
            math.isfinite(spec.duration) and spec.duration >= 0,
            f"--duration must be 0 (run until stopped) or more seconds, got {spec.duration}",
            "--duration 30",
        ),
        (spec.qos in (0, 1), f"--qos must be 0 or 1, got {spec.qos}", "--qos 1"),
        (
            bool(spec.prefix) and not any(c in spec.prefix for c in "/+#\0"),
            f"--prefix must be one topic level without '/', '+' or '#', got {spec.prefix!r}",
            "--prefix sim",
        ),
    )
    for ok, detail, hint in checks:
        if not ok:
            raise UsageError(detail, hint)


def _shape_of(index: int) -> str:
    return SHAPES[index % len(SHAPES)]


@dataclass(slots=True)
class _Device:
    """One simulated device: its topic shape and readings that drift around their base values."""

    id: str
    shape: str
    rng: random.Random
    base_temp: float
    base_humidity: float
    base_power: float
    temp_c: float = 0.0
    humidity: float = 0.0
    battery: float = 1.0
    power_w: float = 0.0
    energy_kwh: float = 0.0
    linkquality: float = 120.0
    contact: bool = True
    seq: int = 0
    last_at: float | None = None

    @classmethod
    def create(cls, device_id: str, shape: str, rng: random.Random) -> _Device:
        """A device with its own random stream and plausible starting readings."""
        device = cls(
            device_id,
            shape,
            rng,
            base_temp=rng.uniform(18.0, 26.0),
            base_humidity=rng.uniform(35.0, 60.0),
            base_power=rng.uniform(5.0, 120.0),
        )
        device.temp_c, device.humidity = device.base_temp, device.base_humidity
        device.battery = rng.uniform(0.6, 1.0)
        device.energy_kwh = rng.uniform(0.0, 500.0)
        device.linkquality = rng.uniform(60.0, 200.0)
        return device

    def next_message(self, now: float) -> tuple[str, bytes]:
        """Drift the readings to wall-clock time `now` and build the next message."""
        self._drift(now)
        match self.shape:
            case "telemetry":
                message = f"devices/{self.id}/telemetry", self._telemetry(now)
            case "raw":
                message = f"devices/{self.id}/raw", self._raw(now)
            case "tasmota":
                message = f"tele/{self.id}/SENSOR", self._tasmota(now)
            case _:
                message = f"zigbee2mqtt/{self.id}", self._zigbee(now)
        self.seq += 1
        return message

    def _drift(self, now: float) -> None:
        rng = self.rng
        # A random walk pulled back towards the base value, so readings wander but stay plausible.
        self.temp_c += rng.gauss(0.0, 0.05) + (self.base_temp - self.temp_c) * 0.02
        humidity = self.humidity + rng.gauss(0.0, 0.1) + (self.base_humidity - self.humidity) * 0.02
        self.humidity = min(100.0, max(0.0, humidity))
        self.battery = max(0.05, self.battery - rng.uniform(0.0, 0.0002))
        self.power_w = max(0.0, self.base_power + rng.gauss(0.0, self.base_power * 0.05))
        if self.last_at is not None:
            self.energy_kwh += self.power_w * max(0.0, now - self.last_at) / 3_600_000
        self.last_at = now
        self.linkquality = min(255.0, max(0.0, self.linkquality + rng.gauss(0.0, 2.0)))
        if rng.random() < 0.02:
            self.contact = not self.contact

    def _telemetry(self, now: float) -> bytes:
        return _json(
            {
                "ts": int(now * 1000),
                "temp_c": round(self.temp_c, 1),
                "humidity": round(self.humidity, 1),
                "battery": round(self.battery, 2),
                "seq": self.seq,
            }
        )

    def _raw(self, now: float) -> bytes:
        return struct.pack(
            RAW_FORMAT,
            RAW_MAGIC,
            RAW_VERSION,
            self.seq & 0xFFFF_FFFF,
            int(now * 1000),
            round(self.temp_c * 100),
            round(self.humidity * 100),
            round(self.battery * 100),
        )

    def _tasmota(self, now: float) -> bytes:
        voltage = 230 + round(self.rng.gauss(0.0, 1.5))
        factor = 0.9
        return _json(
            {
                "Time": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                "ENERGY": {
                    "Total": round(self.energy_kwh, 3),
                    "Power": round(self.power_w),
                    "ApparentPower": round(self.power_w / factor),
                    "ReactivePower": round(self.power_w * math.tan(math.acos(factor))),
                    "Factor": factor,
                    "Voltage": voltage,
                    "Current": round(self.power_w / factor / voltage, 3),
                },
            }
        )

    def _zigbee(self, now: float) -> bytes:
        del now  # zigbee2mqtt sends no timestamp of its own
        return _json(
            {
                "battery": round(self.battery * 100),
                "contact": self.contact,
                "linkquality": round(self.linkquality),
                "voltage": 2700 + round(self.battery * 400),
            }
        )


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _status() -> bytes:
    return _json({"online": True, "fw": FIRMWARE})


def _fleet(spec: FleetSpec) -> list[_Device]:
    fleet_rng = random.Random(spec.seed)  # noqa: S311 - simulated readings, not secrets
    return [
        _Device.create(
            spec.device_id(i),
            _shape_of(i),
            random.Random(fleet_rng.getrandbits(64)),  # noqa: S311 - same
        )
        for i in range(spec.devices)
    ]


class _Window:
    """Publishes through a shared Window, counting acknowledgements per shape."""

    def __init__(self, size: int) -> None:
        self._window = Window(size)
        self.acked: Counter[str] = Counter()

    @property
    def paced(self) -> int:
        """Acknowledged messages, retained statuses not included."""
        return self.acked.total() - self.acked[_STATUS]

    async def send(self, publish: Coroutine[Any, Any, None], shape: str) -> None:
        """Start a publish once a slot is free; re-raise an earlier publish's failure."""
        await self._window.send(self._counted(publish, shape))

    async def _counted(self, publish: Coroutine[Any, Any, None], shape: str) -> None:
        await publish
        self.acked[shape] += 1

    async def drain(self) -> None:
        """Wait for every publish in flight; re-raise the first failure."""
        await self._window.drain()

    def cancel(self) -> None:
        """Abandon what is in flight (a failure or a cancelled run)."""
        self._window.cancel()


class _Schedule:
    """Message k is due at `start + k / rate`; a backlog beyond _MAX_LAG_S is skipped."""

    def __init__(self, rate: float, start: float, total: int | None) -> None:
        self._rate = rate
        self._start = start
        self._total = total
        self._lag = max(1, math.ceil(rate * _MAX_LAG_S))
        self.issued = 0

    @property
    def finished(self) -> bool:
        """All `total` messages are out (never for an endless fleet)."""
        return self._total is not None and self.issued >= self._total

    @property
    def next_due(self) -> float:
        """When the next message is due."""
        return self._start + self.issued / self._rate

    def take(self, now: float) -> int:
        """How many messages to publish now (and count them as issued)."""
        due = math.floor((now - self._start) * self._rate) + 1
        if self._total is not None:
            due = min(due, self._total)
        self.issued = max(self.issued, due - self._lag)
        count = max(0, due - self.issued)
        self.issued += count
        return count


class _Progress:
    """Calls the progress callback about once a second with the rate since the last call."""

    def __init__(
        self, callback: Callable[[FleetProgress], None] | None, start: float, window: _Window
    ) -> None:
        self._callback = callback
        self.start = start
        self._window = window
        self._last = (start, 0)
        self.next_at = start + _PROGRESS_EVERY_S if callback is not None else math.inf

    def tick(self, now: float) -> None:
        """Report when a second has passed since the last report."""
        if self._callback is None or now < self.next_at:
            return
        published = self._window.paced
        last_at, last_count = self._last
        rate = (published - last_count) / (now - last_at) if now > last_at else 0.0
        self._callback(FleetProgress(published, now - self.start, rate))
        self._last = (now, published)
        self.next_at = now + _PROGRESS_EVERY_S


async def run_fleet(
    spec: FleetSpec,
    stop: asyncio.Event | None = None,
    progress: Callable[[FleetProgress], None] | None = None,
    connected: Callable[[], None] = lambda: None,
) -> FleetReport:
    """Run the fleet for `spec.duration` seconds (0: until `stop` is set) and report.

    `connected` is called once the broker took the connection (before the first publish).

    Raises BrokerUnreachable or BrokerRefused (from AsyncConnection) when the broker cannot be
    reached, refuses the login, or goes away while publishing.
    """
    stop = stop or asyncio.Event()
    devices = _fleet(spec)
    window = _Window(WINDOW)
    loop = asyncio.get_running_loop()
    client_id = f"mqtt-backup-simulate-{spec.prefix}-{uuid.uuid4().hex[:8]}"
    async with AsyncConnection(spec.target, client_id) as conn:
        connected()
        start = loop.time()
        try:
            await _announce(conn, spec, window)
            start = loop.time()
            ticker = _Progress(progress, start, window)
            await _publish_paced(conn, spec, devices, window, stop, ticker)
            await window.drain()
        finally:
            window.cancel()
        elapsed = loop.time() - start
    return FleetReport(
        published=window.paced,
        per_shape={shape: window.acked[shape] for shape in spec.shapes},
        retained=window.acked[_STATUS],
        devices=spec.devices,
        elapsed=elapsed,
        topics_for_bridge=spec.topics_for_bridge,
    )


async def _announce(conn: AsyncConnection, spec: FleetSpec, window: _Window) -> None:
    """The retained status of every telemetry device, as a device publishes it on boot."""
    for topic in spec.status_topics:
        await window.send(conn.publish(topic, _status(), qos=spec.qos, retain=True), _STATUS)
    await window.drain()


async def _publish_paced(
    conn: AsyncConnection,
    spec: FleetSpec,
    devices: Sequence[_Device],
    window: _Window,
    stop: asyncio.Event,
    progress: _Progress,
) -> None:
    """Publish on the schedule, round-robin over the devices, until done or stopped."""
    loop = asyncio.get_running_loop()
    start = progress.start
    # The messages due before the end of the duration; a fleet that fell behind still sends the
    # (at most _MAX_LAG_S of) backlog after it, so a run's count does not depend on timer slack.
    total = math.ceil(spec.duration * spec.rate) if spec.duration else None
    schedule = _Schedule(spec.rate, start, total)
    turn = itertools.cycle(devices)
    while not (stop.is_set() or schedule.finished):
        for _ in range(schedule.take(loop.time())):
            device = next(turn)
            topic, payload = device.next_message(time.time())
            await window.send(conn.publish(topic, payload, qos=spec.qos), device.shape)
            if stop.is_set():
                break
        progress.tick(loop.time())
        wake = min(schedule.next_due, progress.next_at)
        await _sleep_or_stop(stop, wake - loop.time())


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    if delay <= 0:
        await asyncio.sleep(0)  # let the window's publishes run
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(delay, _MIN_SLEEP_S)):
            await stop.wait()
