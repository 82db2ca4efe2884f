"""tests/test_units.py's writers: devices writing through a store between an operation's units.

A module of its own so that the kill test's child processes import only this and the product:
`tests.test_units` pulls in pytest and tests/conftest.py (aiomqtt, hypothesis, the bridge), which
cost each child 3-5 s of start-up on a loaded machine, about half the test's time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store
from mqtt_backup.storage.units import Units, step

BASE_NS = 1_700_000_000 * 10**9
DEVICES = 60
PER_DEVICE = 4


class Fleet:
    """Devices writing through the store as ingest does; remembers what each one sent."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sent: dict[str, list[bytes]] = {}
        self._clock = itertools.count(1)

    def publish(self, devices: Iterable[str]) -> None:
        groups: dict[str, list[Pending]] = {}
        for device in devices:
            sent = self.sent.setdefault(device, [])
            payload = b"%s:%d" % (device.encode(), len(sent))
            sent.append(payload)
            partition, dev_key = self.store.locate(device)
            record = Record(f"devices/{device}/t", payload)
            groups.setdefault(partition, []).append(
                Pending(device, dev_key, BASE_NS + next(self._clock), record)
            )
        for partition, items in groups.items():
            self.store.write(partition, items)


def drive(work: Units[object], between: Callable[[int], None]) -> tuple[object, int]:
    """Run every unit, calling `between(n)` after the n-th; the result and the units run."""
    for n in itertools.count(1):
        done = step(work)
        if done is not None:
            return done.result, n
        between(n)
    raise AssertionError("unreachable")


def write_between(fleet: Fleet) -> Callable[[int], None]:
    """The kill test's writes between units: three devices, and a new one each time."""

    def between(n: int) -> None:
        fleet.publish([*(f"dev-{(n * 7 + k) % DEVICES:03d}" for k in range(3)), f"new-{n}"])

    return between
