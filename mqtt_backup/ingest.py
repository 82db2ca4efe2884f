"""The commit pipeline: message, device, partition, group commit, in-order acks.

It does not know which MQTT client feeds it. A transport offers each message with an opaque ack
token, tells the pipeline when to close a batch (socket drained, batch full or old), and gets the
tokens back, in receive order, only after every message of the batch is on disk with a synced WAL.

A batch is committed either on the caller's thread (`commit`) or in a worker thread
(`commit_in_background`, then `settle` on the caller's thread): at most one batch is in flight, and
every other use of the store waits for it first (`settle`, which `commit` calls), so nothing
interleaves with its writes.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Protocol

from mqtt_backup.errors import StorageError, StorageUnavailable
from mqtt_backup.records import DUP_FLAG, Record, topic_field
from mqtt_backup.storage import Pending
from mqtt_backup.tally import TALLY
from mqtt_backup.topics import Router

log = logging.getLogger(__name__)

AckToken = object
HOLD_BATCHES = 10
# The route map: topics whose route is remembered (on a miss the router splits and matches the
# topic, and placement hashes the device once per partition: ~4 us). Bounded by a memory budget,
# not a count: a route costs ROUTE_BYTES plus its topic twice (key and stored field) and its
# device id, ~370 B for a 29-byte topic, so ROUTE_MAP_BYTES holds ~136k such routes: a fleet of
# 100k devices with a topic each stays routed. When full, the oldest eighth goes (first in, first
# out): telemetry comes round device by device, and emptying the map (as it was) made a fleet
# just larger than it miss on every message. A topic longer than TOPIC_CACHE_BYTES is routed
# afresh each time (MQTT allows 65,535 bytes: one would take the room of hundreds of routes).
ROUTE_MAP_BYTES = 48 * 1024 * 1024
ROUTE_BYTES = 300  # a route's fixed part: dict slot, tuple, bytes and str headers, device key
TOPIC_CACHE_BYTES = 256
AckCallback = Callable[[Sequence[AckToken]], None]
_Route = tuple[str, str, bytes, bytes]
_UNKNOWN: _Route = ("", "", b"", b"")  # `_routes.get`'s default: not None, which means "skip"
_getsizeof = sys.getsizeof
_STR_HEAD = sys.getsizeof("")  # an ASCII str's header, counted in ROUTE_BYTES
_new_pending = tuple.__new__  # a Pending from its parts, without `Pending.__new__`'s encoding


@dataclass(slots=True)
class IngestCounters:
    """Running totals for the rate log and metrics."""

    received: int = 0
    stored: int = 0
    skipped: int = 0
    duplicates: int = 0
    batches: int = 0
    bytes: int = 0
    commit_seconds: float = 0.0


@dataclass(slots=True)
class _Batch:
    """A batch taken from the pipeline: what its commit still has to write, and whom to ack."""

    groups: dict[str, list[Pending]]
    tokens: list[AckToken]
    size: int
    opened: float
    prepared: dict[str, object] = field(default_factory=dict)  # partition -> `prepare`'s work
    written: list[list[Pending]] = field(default_factory=list)  # stored so far, per partition
    future: Future[None] | None = None
    seconds: float = 0.0  # how long its writes took


class PipelineStore(Protocol):
    """What the commit pipeline needs from the store (`storage.Store` is one; a test may wrap it).

    Every method may be called again after it raised: the pipeline's recovery is close, wait,
    open, write the same items again.
    """

    def locate(self, device_id: str) -> tuple[str, bytes]:
        """(partition name, device key) of a device, by placement. Pure: raises nothing."""
        ...

    def prepare(self, partition: str, items: Sequence[Pending]) -> object | None:
        """The CPU half of `write` done ahead, on the caller's thread (None: not now).

        Raises StorageError when it has to read and the read fails.
        """
        ...

    def write(
        self, partition: str, items: Sequence[Pending], prepared: object | None = None
    ) -> None:
        """Store the items in one partition with a synced WAL, all or none.

        `prepared`: what `prepare` made of these items (ignored when the partition changed since).
        Raises StorageUnavailable (a StorageError) when the partition is not open or the write or
        sync fails (disk full, I/O error); nothing of the batch is stored then.
        """
        ...

    def open_partitions(self) -> None:
        """Open every partition's database again, all or none.

        Raises StorageError (StorageUnavailable when the disk or I/O fails) when one cannot be
        opened; then none is open.
        """
        ...

    def close_partitions(self) -> None:
        """Drop every database handle (one that failed stays read-only). Raises nothing."""
        ...


class CommitPipeline:
    """Batches messages and stores each batch before acknowledging any of it."""

    def __init__(
        self,
        store: PipelineStore,
        router: Router,
        ack: AckCallback,
        batch_max: int = 1000,
        batch_ms: int = 20,
    ) -> None:
        self._store = store
        self._router = router
        self._ack = ack
        self.batch_max = batch_max
        self._batch_s = batch_ms / 1000
        self._groups: dict[str, list[Pending]] = {}
        self._tokens: list[AckToken] = []
        self._size = 0
        self._opened = 0.0
        self._broken = False
        self._recovering = False
        self._connection = 0
        self.counters = IngestCounters()
        # The last moment everything the broker had for the bridge was stored and acknowledged:
        # a gap after a lost session starts here, not when the bridge last saved its state.
        self.caught_up_ns = 0
        self.connecting_ns = 0  # when the current connection was opened
        # topic -> (partition, device, device key, stored topic bytes); None: not to be stored.
        # In insertion order: the first ones are the oldest, evicted first.
        self._routes: dict[bytes, _Route | None] = {}
        self._route_bytes = 0  # what the routes cost, as `_route_cost` estimates it
        self._in_flight: _Batch | None = None
        self._writing_since: float | None = None  # monotonic; read from other threads (health)

    @property
    def pending(self) -> int:
        """Messages received and not yet stored (the commit in flight included)."""
        flight = self._in_flight
        return self._size + (flight.size if flight is not None else 0)

    @property
    def has_work(self) -> bool:
        """Something waits to be stored or acknowledged, or a commit is in flight."""
        return self._size > 0 or bool(self._tokens) or self._in_flight is not None

    @property
    def committing(self) -> bool:
        """A commit started by `commit_in_background` is not settled yet."""
        return self._in_flight is not None

    def offer(self, record: Record, token: AckToken | None, replayed: bool = False) -> None:
        """Take one received message; `token` is None for QoS 0 (nothing to acknowledge)."""
        self.counters.received += 1
        if not self._size and not self._tokens:
            self._opened = time.monotonic()
        if token is not None:
            self._tokens.append(token)
        route = None if replayed else self._route(record.topic.encode("utf-8"))
        if route is None:
            # The bridge's own traffic, its replays and unmatched topics are acknowledged unstored.
            self.counters.skipped += 1
            return
        partition, device, dev_key, _ = route
        item = Pending(device, dev_key, time.time_ns(), record)
        self._groups.setdefault(partition, []).append(item)
        self._size += 1

    def offer_publishes(
        self,
        topics: Sequence[bytes],
        payloads: Sequence[bytes],
        flags: Sequence[int],
        tokens: Sequence[AckToken],
        received_ns: int,
    ) -> bool:
        """`offer` for messages without properties, from their wire parts; whether `full()`.

        The transport's fast path (QoS 1 telemetry), one call per read of the socket: the i-th
        message is `topics[i]` (UTF-8 bytes as received; UnicodeDecodeError when they are not),
        `payloads[i]`, `flags[i]` (as `records.stored_flags` makes them) and `tokens[i]`. No
        `Record` is made: one tuple per message, the stored topic bytes once per topic.
        """
        if not tokens:
            return self._size >= self.batch_max
        if not self._size and not self._tokens:
            self._opened = time.monotonic()
        self.counters.received += len(tokens)
        self._tokens += tokens
        routes, groups, size, skipped = self._routes, self._groups, self._size, 0
        try:
            for topic, payload, flag in zip(topics, payloads, flags, strict=True):
                route = routes.get(topic, _UNKNOWN)
                if route is _UNKNOWN:
                    route = self._new_route(topic)
                if route is None:
                    skipped += 1
                    continue
                partition, device, dev_key, middle = route
                item = _new_pending(Pending, (device, dev_key, received_ns, flag, middle, payload))
                group = groups.get(partition)
                if group is None:
                    groups[partition] = [item]
                else:
                    group.append(item)
                size += 1
        finally:
            # A topic that is not UTF-8 raises midway: what was placed before it still counts
            # (else the batch looks empty and nothing commits it).
            self._size = size
            self.counters.skipped += skipped
        return size >= self.batch_max

    def _route(self, topic: bytes) -> _Route | None:
        """Where a topic's messages go, remembered (telemetry repeats its few topics).

        None: not to be stored. The router splits and matches the topic, the store places the
        device, and the stored topic bytes are made: once per topic while the map holds it.
        """
        routes = self._routes
        if topic in routes:
            return routes[topic]
        return self._new_route(topic)

    def _new_route(self, topic: bytes) -> _Route | None:
        """`_route` of a topic the map does not hold: worked out, then remembered.

        Once per message of a fleet that sends each device once (`bench --only devices` at
        100k devices), so kept flat: the route's cost is summed inline (`_route_cost`).
        """
        device = self._router.device_of(topic.decode("utf-8"))
        size = len(topic)
        if device is None:
            route = None
            cost = ROUTE_BYTES + 2 * size
        else:
            partition, dev_key = self._store.locate(device)
            route = (partition, device, dev_key, topic_field(topic))
            # = _route_cost: an ASCII id's str holds a byte a character (`isascii` is a flag)
            chars = len(device) if device.isascii() else _getsizeof(device) - _STR_HEAD
            cost = ROUTE_BYTES + 2 * size + chars
        if size <= TOPIC_CACHE_BYTES:
            self._route_bytes += cost
            if self._route_bytes > ROUTE_MAP_BYTES:
                self._evict_routes()
            self._routes[topic] = route
        return route

    def _evict_routes(self) -> None:
        """Forget the oldest eighth of the routes (one at least)."""
        routes = self._routes
        oldest = list(itertools.islice(routes, len(routes) // 8 + 1))
        freed = 0
        for topic in oldest:
            freed += _route_cost(topic, routes.pop(topic))
        self._route_bytes -= freed

    @property
    def cached_routes(self) -> int:
        """Topics whose route is remembered now."""
        return len(self._routes)

    @property
    def route_bytes(self) -> int:
        """What the remembered routes cost, as estimated (bounded by ROUTE_MAP_BYTES)."""
        return self._route_bytes

    def full(self) -> bool:
        """The batch reached its size limit: commit before reading more."""
        return self._size >= self.batch_max

    def due(self) -> bool:
        """The batch is full or has waited its time limit."""
        return self.has_work and (self.full() or time.monotonic() - self._opened >= self._batch_s)

    def seconds_left(self) -> float:
        """How long the open batch may still wait for more messages."""
        return max(0.0, self._batch_s - (time.monotonic() - self._opened))

    def commit(self) -> int:
        """Store the batch (one synced write per partition), then acknowledge it in receive order.

        A commit in flight is settled first (its acks go out before this batch's). Raises
        StorageUnavailable when a write fails: what is not stored stays pending and
        unacknowledged, the database handles are dropped, and the next call reopens them.
        """
        settled = self.settle() or 0
        batch = self._take()
        if batch is None:
            return settled
        try:
            self._store_batch(batch)
        except BaseException:
            self._hold_again(batch)
            raise
        return settled + self._finish(batch)

    def write_seconds(self) -> float:
        """How long the write under way has been waiting (0 when none): a hung disk shows here.

        A write that fails is a stall; one that never returns (fsync on a dead disk, a network
        filesystem gone) fails nothing, so health reads this too.
        """
        since = self._writing_since
        return 0.0 if since is None else time.monotonic() - since

    def commit_in_background(self, executor: Executor) -> Future[None] | None:
        """Start storing the batch on `executor`'s thread; None when nothing waits or one is.

        The loop goes on reading meanwhile: what arrives makes the next batch. Nothing of this
        batch is acknowledged until `settle` (on the caller's thread) finishes it.
        """
        if self._in_flight is not None:
            return None
        batch = self._take()
        if batch is None:
            return None
        if not self._broken:
            self._prepare(batch)
        batch.future = executor.submit(self._store_batch, batch)
        return batch.future

    def settle(self, which: Future[None] | None = None) -> int | None:
        """Wait for the commit in flight (only `which`, when given) and finish it.

        Returns how many messages it stored, once its tokens went to the ack callback in receive
        order; None when there was no such commit (it was settled already). Raises
        StorageUnavailable when it failed: what it did not store is held again, ahead of what was
        received since, and nothing of it is acknowledged.
        """
        batch = self._in_flight
        if batch is None or batch.future is None or which not in (None, batch.future):
            return None  # none, or a commit on this thread (`commit`) is still writing
        try:
            batch.future.result()
        except BaseException:
            self._hold_again(batch)
            raise
        return self._finish(batch)

    def _take(self) -> _Batch | None:
        """The open batch, now in flight, leaving an empty one; None when nothing waits."""
        if not self._size and not self._tokens:
            return None
        batch = _Batch(self._groups, self._tokens, self._size, self._opened)
        # In flight before the open batch empties: `pending`, read from other threads (metrics,
        # tests), may count a batch twice for a moment but never drops it.
        self._in_flight = batch
        self._groups, self._tokens, self._size = {}, [], 0
        return batch

    def _store_batch(self, batch: _Batch) -> None:
        """One synced write per partition; on the committing thread, the only one on the store."""
        started = time.perf_counter()
        self._writing_since = time.monotonic()
        try:
            if self._broken:
                self._reopen()
            groups = batch.groups
            for partition in list(groups):
                items = groups[partition]
                try:
                    self._store.write(partition, items, batch.prepared.get(partition))
                except StorageError:
                    self._broken = True
                    self._store.close_partitions()
                    raise
                del groups[partition]
                batch.written.append(items)
        except StorageError as exc:
            _drop_frames(exc)
            raise
        finally:
            self._writing_since = None
            batch.prepared.clear()  # it holds the partitions' handles (and RocksDB's locks)
        batch.seconds = time.perf_counter() - started

    def _prepare(self, batch: _Batch) -> None:
        """Encode the batch here, so that the commit thread mostly waits without the GIL."""
        try:
            for partition, items in batch.groups.items():
                prepared = self._store.prepare(partition, items)
                if prepared is not None:
                    batch.prepared[partition] = prepared
        except StorageError:
            batch.prepared.clear()  # the commit thread prepares again, and meets the failure

    def _finish(self, batch: _Batch) -> int:
        """The batch is stored: count it and acknowledge it in receive order."""
        stored = self._count(batch)
        self._in_flight = None  # after the count: `stored` grows before `pending` shrinks
        if self._recovering:
            self._recovering = False
            log.warning("storage is writable again: resuming")
        self._ack(batch.tokens)
        self.counters.batches += 1
        self.counters.commit_seconds += batch.seconds
        TALLY.committed(stored, batch.seconds)
        return stored

    def _hold_again(self, batch: _Batch) -> None:
        """A commit failed: what it did not store is pending again, ahead of what came since.

        What it did store stays stored (a device's items live in one partition, so receive order
        holds); all of its tokens wait for a later commit.
        """
        stored = self._count(batch)
        for partition, items in self._groups.items():
            batch.groups.setdefault(partition, []).extend(items)
        self._groups = batch.groups
        self._tokens = batch.tokens + self._tokens
        self._size += batch.size - stored
        self._opened = batch.opened
        self._in_flight = None

    def _reopen(self) -> None:
        try:
            self._store.open_partitions()
        except StorageError as exc:
            self._store.close_partitions()
            raise StorageUnavailable(exc.detail) from exc
        self._broken = False
        self._recovering = True

    def _count(self, batch: _Batch) -> int:
        """Count what the batch's writes stored (once) and return how many messages."""
        c = self.counters
        stored = size = dups = 0
        for items in batch.written:
            stored += len(items)
            size += sum([len(item[5]) for item in items])  # the payloads
            dups += sum([item[3] & DUP_FLAG for item in items]) // DUP_FLAG  # by their flags
        c.stored += stored
        c.bytes += size
        c.duplicates += dups
        batch.written = []
        return stored

    def caught_up(self, at_ns: int) -> None:
        """The transport found nothing more to read at `at_ns`, and all before it is stored."""
        self.caught_up_ns = max(self.caught_up_ns, at_ns)

    def can_hold(self) -> bool:
        """Room to hold more while storage fails.

        The broker's window bounds the QoS 1 messages of one connection, but neither QoS 0 nor
        the copies held from earlier connections (kept, never dropped: see `new_connection`).
        """
        return self.pending < HOLD_BATCHES * self.batch_max

    def new_connection(self) -> int:
        """A new broker connection starts: what arrives from now on belongs to it; its number.

        The number is the connection generation, counted here only: the transports put it in
        their ack tokens, so that an ack never goes out on a connection other than its message's.

        What is held from earlier connections stays and is stored as it was received: the broker
        resends an unacknowledged QoS 1 message (DUP set, stored as a flagged copy) only if its
        message expiry has not passed meanwhile, so the held copy may be the only one.
        """
        self._connection += 1
        self.connecting_ns = time.time_ns()
        return self._connection

    def regroup(self) -> None:
        """Place what is held again: an operation may have changed the partition set."""
        self._routes.clear()  # they name partitions
        self._route_bytes = 0
        held = [item for items in self._groups.values() for item in items]
        self._groups = {}
        for item in held:  # a device's items stay in receive order
            partition, _ = self._store.locate(item.device_id)
            self._groups.setdefault(partition, []).append(item)

    def drop_tokens(self, keep: Callable[[AckToken], bool]) -> None:
        """Forget ack tokens the transport can no longer use (from a closed connection)."""
        self._tokens = [t for t in self._tokens if keep(t)]


def _route_cost(topic: bytes, route: _Route | None) -> int:
    """The memory a remembered route takes, estimated: its fixed part, the topic twice, the id.

    The id as the str object holds it (`getsizeof` past an ASCII str's header, which ROUTE_BYTES
    counts): 1 to 4 bytes a character. Its length in characters undercounted ids of non-ASCII
    characters, and a map of such routes grew to ~1.24x its budget (~59 of 48 MiB).
    """
    if route is None:
        return ROUTE_BYTES + 2 * len(topic)
    device = route[1]
    chars = len(device) if device.isascii() else _getsizeof(device) - _STR_HEAD
    return ROUTE_BYTES + 2 * len(topic) + chars


def _drop_frames(exc: BaseException) -> None:
    """Let go of the frames in `exc`'s traceback chain.

    A failed write's frames hold its partition's database handle, and with it RocksDB's lock on
    the directory, for as long as the exception lives: a future keeps it, so the partitions could
    not be opened again until a garbage collection.
    """
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
