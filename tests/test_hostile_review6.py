"""Hostile review 6: paho on the bridge's loop, the index cache, restore read-ahead.

Each test here failed before the fix it comes with (docs/design-notes.md says what each fixed).
Real Mosquitto and real RocksDB; faults are injected only where a real part cannot fail on cue.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from mqtt_backup.config import BrokerAddress, BrokerTarget
from mqtt_backup.mqtt import PahoIngest, Session
from mqtt_backup.storage import Store
from tests.conftest import Broker, Sent, publish, read_all, wait_until
from tests.faulty import Faults
from tests.test_async_ingest import Hooks, Running, _pipeline, store

__all__ = ["store"]  # the fixture, shared with test_async_ingest


def _paho(broker: Broker, hooks: Hooks, topic: str, keepalive: int) -> PahoIngest:
    address = BrokerAddress("127.0.0.1", broker.port)
    session = Session(BrokerTarget(address), "paho-paused", keepalive=keepalive)
    return PahoIngest(session, [topic], hooks)


def test_paho_keeps_its_connection_while_reading_is_paused_past_the_keepalive(
    broker: Broker, store: Store, data_dir: Path, unique: str
) -> None:
    """A full hold pauses reading; the broker's PINGRESPs wait in the socket meanwhile.

    paho's own keepalive check read that as a dead broker (no PINGRESP read for a keepalive) and
    dropped the connection: the retained will said the bridge was offline, every held message
    was sent again and stored twice, and no new connection came until storage was back.
    """
    faults, hooks = Faults(failing=True), Hooks()
    ingest = _paho(broker, hooks, f"devices/{unique}/#", keepalive=1)
    pipeline = _pipeline(store, faults, ingest.ack, batch_max=20)  # holds 200 at most
    ingest.connect(pipeline, [])
    sent = [Sent(f"devices/{unique}/t", b"%04d" % i + b"x" * 1000, qos=0) for i in range(2000)]
    with Running(ingest, pipeline):
        publish(broker, sent)
        wait_until(lambda: ingest.paused, 20, "reading to pause")
        retried = faults.calls["write_failed"]
        # Three keepalives paused: paho pinged and, reading nothing, gave the broker up.
        wait_until(lambda: faults.calls["write_failed"] > retried + 2, 30, "three more retries")
        assert hooks.disconnects == [], "the connection stays while reading is paused"
        faults.failing = False
        wait_until(lambda: pipeline.counters.stored == len(sent), 40, "every message stored")
    stored = [m.record.payload for m in read_all(data_dir)[unique]]
    assert stored == [m.payload for m in sent], "in order, none lost"
    assert hooks.disconnects == []


def test_paho_resumed_reading_is_not_quiet_for_the_silence_it_was_paused(
    broker: Broker, store: Store, unique: str
) -> None:
    """The silence while paused is ours: a resumed reader is not `quiet()` before a tick.

    `quiet()` (a tick with nothing read) lets the housekeeping mark the bridge caught up with
    the broker; right after a resume the socket may hold a window of unread messages, and a
    caught-up time set then makes a later session-lost gap start too late (a restore says
    complete for messages the broker lost). AsyncIngest's `resume()` forgets the silence;
    paho's did not.
    """
    ingest = _paho(broker, Hooks(), f"devices/{unique}/#", keepalive=10)
    pipeline = _pipeline(store, Faults(), ingest.ack)
    ingest.connect(pipeline, [])
    assert ingest._loop is not None

    async def paused_then_resumed() -> tuple[bool, bool]:
        ingest.pause()
        await asyncio.sleep(0.2)  # two ticks paused
        quiet_while_paused = ingest.quiet()
        ingest.resume()
        return quiet_while_paused, ingest.quiet()

    quiet_while_paused, quiet_after = ingest._loop.run_until_complete(paused_then_resumed())
    stop = threading.Event()
    stop.set()
    ingest.run(pipeline, stop)
    assert quiet_while_paused
    assert not quiet_after, "resumed: the silence before counts for nothing"
