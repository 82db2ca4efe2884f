"""Hostile review of issue 10's changes: what a hostile broker, client or timing does to them.

Each test pins one attack on the changes merged for issue 10 (reading through the writer's
handles, operations beside the ingest loop, the hand-written PUBLISH path, the restore send
path, start-up). Real RocksDB in temp dirs; faults and thread interleavings injected only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqtt_backup import operations
from mqtt_backup.ingest import CommitPipeline
from mqtt_backup.keys import device_key
from mqtt_backup.placement import Weighted, place
from mqtt_backup.storage import Store
from mqtt_backup.storage import store as store_module
from mqtt_backup.topics import Router, parse_template


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    """A new 2-partition store, closed after the test."""
    opened = Store.open(data_dir, 2)
    yield opened
    opened.close()


def _pipeline(store: Store, acked: list[object]) -> CommitPipeline:
    router = Router([parse_template("devices/{device}/#")], "backup")
    return CommitPipeline(store, router, acked.extend, batch_max=50, batch_ms=10)


# --- 3. the hand-written PUBLISH path --------------------------------------------------------


def test_a_bad_topic_mid_read_leaves_the_messages_before_it_counted_and_stored(
    store: Store,
) -> None:
    """A read of [good, topic not UTF-8]: the good one was placed in the batch, so it counts.

    The fast path hands a whole read to `offer_publishes`; the bad topic raises from inside
    its loop (the transport then fails the connection). What the loop placed before must be
    counted as pending, or the batch looks empty: `pending` says 0, and once the reconnect
    drops the dead connection's tokens nothing commits it.
    """
    acked: list[object] = []
    pipeline = _pipeline(store, acked)
    with pytest.raises(UnicodeDecodeError):
        pipeline.offer_publishes(
            [b"devices/d1/t", b"devices/\xff\xfe/t"], [b"a", b"b"], [0, 0], [1, 2], 1
        )
    assert pipeline.pending == 1
    pipeline.drop_tokens(lambda _token: False)  # what the reconnect does
    assert pipeline.has_work
    pipeline.commit()
    assert pipeline.counters.stored == 1
    assert acked == []  # the dead connection's tokens are never acknowledged


# --- 2. operations in a worker thread while the loop reads on --------------------------------


def _a_device_that_moves_to(store: Store, name: str) -> str:
    """A device id whose home becomes `name` once a partition of that name is added."""
    after = [*store.manifest.weighted, Weighted(name)]
    return next(d for d in (f"d{i}" for i in range(1000)) if place(device_key(d), after) == name)


def test_a_placement_read_racing_a_partitions_add_is_not_cached_stale(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop places a message (`locate`) while the operation thread adds a partition.

    Since operations run beside the reading loop, `Store.locate` on the loop can compute a
    device's place from the old layout, lose the GIL while the operation switches the layout
    and empties the placement cache, and then cache its stale answer. `regroup` after the
    operation asks `locate` again, gets the stale partition, and the device's messages are
    written outside its home from then on. Injected: the switch lands inside `place`.
    """
    device = _a_device_that_moves_to(store, "p9")
    real_place = place
    raced = threading.Event()

    def place_while_the_layout_switches(dev_key: bytes, partitions: list[Weighted]) -> str:
        answer = real_place(dev_key, partitions)
        if dev_key == device_key(device) and not raced.is_set():
            raced.set()
            worker = threading.Thread(
                target=operations.run, args=(store, "partitions-add", {"name": "p9"})
            )
            worker.start()
            worker.join()
        return answer

    monkeypatch.setattr(store_module, "place", place_while_the_layout_switches)
    store.locate(device)  # on the loop, as a message of the device arrives
    assert raced.is_set()
    assert "p9" in store.partitions
    assert store.locate(device) == ("p9", device_key(device))
