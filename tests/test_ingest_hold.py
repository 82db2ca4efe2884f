"""What the bridge holds while storage fails: kept across reconnects, acknowledged only where due.

A real store in a temp dir behind `tests/faulty.py`, and a real broker for the transport.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from mqtt_backup import bridge as bridge_module
from mqtt_backup.bridge import Bridge
from mqtt_backup.config import BrokerAddress, BrokerTarget
from mqtt_backup.errors import StorageUnavailable
from mqtt_backup.ingest import AckCallback, CommitPipeline
from mqtt_backup.mqtt import AsyncIngest, PahoIngest, Session
from mqtt_backup.records import Record
from mqtt_backup.storage import Store
from mqtt_backup.storage.journal import BridgeState
from mqtt_backup.topics import Router, parse_template
from tests.conftest import Broker, make_settings, read_all, wait_until
from tests.faulty import Faults


class Acks:
    """The pipeline's ack callback: every token it was given, in order."""

    def __init__(self) -> None:
        self.tokens: list[object] = []

    def __call__(self, tokens: Sequence[object]) -> None:
        self.tokens.extend(tokens)


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    """A new 3-partition store, closed after the test."""
    opened = Store.open(data_dir, 3)
    yield opened
    opened.close()


def _pipeline(
    store: Store, faults: Faults, acks: AckCallback, batch_max: int = 100
) -> CommitPipeline:
    router = Router([parse_template("devices/{device}/#")], "backup")
    return CommitPipeline(faults.wrap(store), router, acks, batch_max=batch_max, batch_ms=10)


def test_held_copies_outlive_their_connection_and_only_new_tokens_are_acked(
    store: Store, data_dir: Path
) -> None:
    faults, acks = Faults(failing=True), Acks()
    pipeline = _pipeline(store, faults, acks)
    pipeline.new_connection()
    for n in range(5):
        pipeline.offer(Record(f"devices/d{n % 2}/t", b"old%d" % n), ("conn1", n))
    with pytest.raises(StorageUnavailable):
        pipeline.commit()

    # The connection drops; the broker resends m0..m2 (DUP set) but m3, m4 expired meanwhile.
    pipeline.drop_tokens(lambda _token: False)
    pipeline.new_connection()
    for n in range(3):
        pipeline.offer(Record(f"devices/d{n % 2}/t", b"old%d" % n, dup=True), ("conn2", n))
    faults.failing = False
    assert pipeline.commit() == 8

    assert acks.tokens == [("conn2", 0), ("conn2", 1), ("conn2", 2)], "no token of conn1"
    stored = [m.record for ms in read_all(data_dir).values() for m in ms]
    assert sorted((r.payload, r.dup) for r in stored) == sorted(
        [(b"old%d" % n, False) for n in range(5)] + [(b"old%d" % n, True) for n in range(3)]
    )
    assert pipeline.counters.duplicates == 3


class _Hooks:
    """The bridge's side of the transport, recording what it hears."""

    def __init__(self) -> None:
        self.connects = 0

    def connected(self, _session_present: bool, _subscribed: Sequence[str]) -> None:
        self.connects += 1

    def disconnected(self, _reason: str) -> None:
        return None

    def tick(self) -> None:
        return None


def test_a_full_hold_waits_for_storage_before_taking_a_new_connection(
    broker: Broker, store: Store, data_dir: Path, unique: str, transport: str
) -> None:
    """Each connection may bring one more broker window; with no room left, storage comes first."""
    faults, hooks = Faults(failing=True), _Hooks()
    session = Session(BrokerTarget(BrokerAddress("127.0.0.1", broker.port)), f"hold-{unique}")
    kind = AsyncIngest if transport == "asyncio" else PahoIngest
    ingest = kind(session, [f"devices/{unique}/#"], hooks)
    pipeline = _pipeline(store, faults, ingest.ack, batch_max=10)
    held = 0
    while pipeline.can_hold():  # held from a connection that is gone now
        pipeline.offer(Record(f"devices/{unique}/t", b"h%d" % held), (0, held, 1))
        held += 1
    stop = threading.Event()
    runner = threading.Thread(target=ingest.run, args=(pipeline, stop), daemon=True)
    runner.start()
    try:
        wait_until(lambda: faults.calls["write_failed"] >= 2, 20, "storage to be retried")
        assert hooks.connects == 0, "no new connection while the hold is full"
        assert not ingest.connected
        faults.failing = False
        wait_until(lambda: hooks.connects == 1, 20, "the connection once storage works")
    finally:
        stop.set()
        runner.join(20)
    assert not runner.is_alive()
    assert len(read_all(data_dir)[unique]) == held, "every held message stored"


def test_a_failing_state_file_is_reported_once_per_episode(
    broker: Broker,
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bridge_module, "STATE_EVERY_S", 0.0)  # save at every tick
    bridge = Bridge(make_settings(broker, data_dir))
    blocker = data_dir / "state.json.tmp"  # a directory where the temp file goes: writes fail
    bridge.pipeline.caught_up(1)  # something to save: the moment the bridge last caught up
    try:
        with caplog.at_level(logging.INFO, logger="mqtt_backup.bridge"):
            for _episode in range(2):
                blocker.mkdir()
                for _ in range(5):
                    bridge.tick()
                blocker.rmdir()
                bridge.tick()
                bridge.tick()
                assert BridgeState.load(data_dir).last_alive_ns > 0, "saved again"
    finally:
        bridge.store.close()
    said = [r.getMessage() for r in caplog.records if "bridge state" in r.getMessage()]
    assert len(said) == 4, said
    assert all(m.startswith("could not save the bridge state") for m in said[0::2]), said
    assert said[1::2] == ["the bridge state is saved again"] * 2
