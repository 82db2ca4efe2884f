"""What both ingest transports share: the commit path, driven from the bridge's asyncio loop.

`LoopIngest` is an ingest transport without its wire. It keeps one commit in flight in a worker
thread (`commit_or_hold`: a batch goes when the socket has nothing more to read, or when it is
full; what arrives meanwhile makes the next group commit), settles it on the loop (the sink
acknowledges in receive order, only after the synced write), holds while storage fails or an
operation owns the store (within the broker's window; reading paused when the hold is full,
resumed after a commit that works), gives the bridge's operations `hold`, `commit_held` and
`settled`, reconnects with backoff, and shuts down in order (stop reading, commit, ack, say
goodbye). The transports add only the wire: `AsyncIngest` (`async_ingest`: an asyncio Protocol
on the `mqtt5` codec) and `PahoIngest` (`ingest`: paho's external-loop callbacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from mqtt_backup.errors import BrokerError, StorageUnavailable
from mqtt_backup.mqtt.backoff import Backoff
from mqtt_backup.mqtt.session import (
    CAUGHT_UP_BELOW,
    Hooks,
    Presence,
    Session,
    Sink,
    Stall,
    describe,
)

log = logging.getLogger(__name__)

TICK_S = 0.1  # how often the bridge's periodic work runs and `stop` is looked at
_T = TypeVar("_T")


class PipelinedSink(Sink, Protocol):
    """A sink that can commit in a worker thread (`ingest.CommitPipeline` is one)."""

    @property
    def committing(self) -> bool:
        """A commit runs in the worker thread, not settled yet."""

    def commit_in_background(self, executor: Executor) -> Future[None] | None:
        """Start storing the batch on `executor`; None when nothing waits or one is in flight."""

    def settle(self, which: Future[None] | None = None) -> int | None:
        """Finish the commit in flight (acks in receive order); StorageUnavailable if it failed."""

    def offer_publishes(
        self,
        topics: Sequence[bytes],
        payloads: Sequence[bytes],
        flags: Sequence[int],
        tokens: Sequence[int],
        received_ns: int,
    ) -> bool:
        """Take messages without properties from their wire parts; whether the batch is full."""


class Beside(Protocol):
    """Services that run on the ingest loop beside it (the bridge's restore and control socket)."""

    async def start(self) -> None:
        """Start them (the loop runs; ingest is connected)."""

    async def settle(self) -> None:
        """Before the last commit: end what touches the store, and start nothing more."""

    async def stop(self) -> None:
        """After the shutdown: stop them."""


class Reading(Protocol):
    """The reading side of one connection, as the commit path steers it."""

    @property
    def paused(self) -> bool:
        """Whether reading is paused."""

    def pause(self) -> None:
        """Stop reading (the broker keeps what it has not sent; its window bounds the rest)."""

    def resume(self) -> None:
        """Read again."""

    def quiet(self) -> bool:
        """Whether a tick went by with nothing read."""


class LoopIngest(ABC):
    """An ingest transport on an asyncio loop of its own (the bridge's): all but the wire."""

    def __init__(self, session: Session, filters: Sequence[str], hooks: Hooks) -> None:
        self.session = session
        self.filters = list(filters)
        self._hooks = hooks
        self.sink: PipelinedSink | None = None
        self.stall = Stall()
        self._connected = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None  # the commit's worker thread
        self._drained_at: int | None = None  # the socket ran dry, the broker had nothing more
        self._held = False  # an operation owns the store: commit nothing, hold what comes
        self._commit_done: asyncio.Future[None] | None = None  # the last commit started

    @property
    def connected(self) -> bool:
        """Whether a connection to the broker is up."""
        return self._connected

    # ---- the wire: what each transport adds ---------------------------------------------------

    @abstractmethod
    def _reading(self) -> Reading | None:
        """The open connection's reading side once its handshake is through, unless it fails."""

    @abstractmethod
    async def _first_connect(self, sink: PipelinedSink, known_filters: Sequence[str]) -> bool:
        """Open and set up the first connection (its errors carry hints); session present?"""

    @abstractmethod
    async def _connect(self, sink: PipelinedSink, known_filters: Sequence[str]) -> bool:
        """Open and set up a connection (reconnecting); whether the broker had the session."""

    @abstractmethod
    async def _serve(self, sink: PipelinedSink, stop: threading.Event) -> None:
        """Until `stop` is set: wait for the wire, reconnect, housekeeping, the bridge's tick."""

    @abstractmethod
    async def _drop(self) -> None:
        """Let the connection go at once (before a reconnect, or at a shutdown without one)."""

    @abstractmethod
    async def _goodbye(self) -> None:
        """After the last commit: the offline status, DISCONNECT, and the close of the socket."""

    @abstractmethod
    def _announce(self, online: bool) -> None:
        """Publish the retained status on the open connection."""

    # ---- the loop of its own (the bridge's) ---------------------------------------------------

    def _run_loop(self, work: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(work)

    def _close_loop(self) -> None:
        if self._executor is not None:
            # A commit still in flight (only after an error) ends first: unacknowledged, safe.
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def connect(self, sink: PipelinedSink, known_filters: Sequence[str]) -> bool:
        """First connection: BrokerError when the broker cannot be reached or refuses.

        Messages may arrive as soon as the broker answers (a stored queue), so the sink comes
        first. Returns whether the broker still had the session; `known_filters` are the
        subscriptions the session had before.
        """
        self.sink = sink
        try:
            return self._run_loop(self._first_connect(sink, known_filters))
        except BaseException:
            self._close_loop()
            raise

    def run(self, sink: PipelinedSink, stop: threading.Event, beside: Beside | None = None) -> None:
        """Feed the sink until `stop` is set, reconnecting with backoff; then shut down in order.

        `beside`: the bridge's other services, on this loop from start to end: started first,
        settled before the last commit (nothing of theirs touches the store after it), stopped
        after the shutdown.
        """
        self.sink = sink
        try:
            self._run_loop(self._run(sink, stop, beside))
        finally:
            self._close_loop()

    async def _run(self, sink: PipelinedSink, stop: threading.Event, beside: Beside | None) -> None:
        try:
            try:
                if beside is not None:
                    await beside.start()  # inside: what it started is stopped if it fails
                await self._serve(sink, stop)
            finally:
                if beside is not None:
                    await beside.settle()
                await self._shutdown(sink)
        finally:
            if beside is not None:
                await beside.stop()
            # loop.close() does not wait for it: a restore's chunk read queued there would run
            # after the store closed.
            await asyncio.get_running_loop().shutdown_default_executor()

    # ---- committing ---------------------------------------------------------------------------

    def _between_reads(self, reader: Reading) -> None:
        """Housekeeping: retry a stalled commit when due, commit a leftover batch, caught up."""
        sink = self.sink
        if sink is None:
            return
        if reader.paused and not self.stall.active and not sink.committing and not self._held:
            reader.resume()  # the commit it waited for was settled by the bridge (an operation)
        if self.stall.active and self.stall.seconds_left() == 0:
            self.commit_or_hold(reader, retry=True)
        elif not self.stall.active and sink.has_work:
            self.commit_or_hold(reader)  # a batch left over (an operation's end, a handshake)
        if reader.quiet() and not self.stall.active and not sink.has_work:
            sink.caught_up(time.time_ns())  # a tick went by with nothing from the broker

    def commit_or_hold(
        self, reader: Reading, retry: bool = False, drained_at: int | None = None
    ) -> None:
        """Start committing the batch in the worker thread; while storage fails, hold.

        One commit at a time: while one is in flight, what arrives makes the next batch, which
        grows past `batch_max` if it must (reading on is what overlaps the parse with the
        fsyncs); reading pauses only when the hold is full, as while storage fails or an
        operation holds commits. `drained_at`: a read found the socket empty then.
        """
        sink = self.sink
        if sink is None:
            return
        if drained_at is not None and sink.pending < CAUGHT_UP_BELOW:
            # Drained, with fewer unacknowledged than any broker's window: the broker had nothing
            # held back, so all it had sent by then is stored once the next batch is.
            self._drained_at = drained_at
        if sink.committing or (self.stall.active and not retry) or self._held:
            if not sink.can_hold():
                reader.pause()  # resumed when a commit returns, or by the housekeeping
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ingest.commit")
        done = sink.commit_in_background(self._executor)
        drained_at, self._drained_at = self._drained_at, None
        if done is None:  # nothing to store or acknowledge
            self._stored(reader, drained_at)
            return
        wrapped = asyncio.wrap_future(done)
        wrapped.add_done_callback(lambda _: self._committed(reader, done, drained_at, wrapped))
        self._commit_done = wrapped

    def _committed(
        self,
        reader: Reading,
        done: Future[None],
        drained_at: int | None,
        wrapped: asyncio.Future[None],
    ) -> None:
        """A commit returned from the worker thread: settle it here (acks), then start the next.

        Its outcome is read from `done`; the loop's wrapper of it is marked read too, or a
        failed commit would also be logged by asyncio as a never-retrieved exception.
        """
        if not wrapped.cancelled():
            wrapped.exception()
        sink = self.sink
        if sink is None:
            return
        try:
            stored = sink.settle(done)
        except StorageUnavailable as exc:
            self.stall.failed(exc)
            if sink.can_hold():
                reader.resume()  # hold what comes, within the broker's window
            else:
                reader.pause()
            return
        if stored is None:
            return  # settled already, by a commit on the loop (an operation, the shutdown)
        self._stored(reader, drained_at)
        if self._reading() is reader and sink.has_work:
            self.commit_or_hold(reader)  # what arrived meanwhile: the next group commit

    def _stored(self, reader: Reading, drained_at: int | None) -> None:
        """A commit worked: storage is fine, reading goes on."""
        self.stall.cleared()
        reader.resume()
        if drained_at is not None and self.sink is not None:
            self.sink.caught_up(drained_at)

    # ---- the bridge's operations ----------------------------------------------------------------

    def announce(self, presence: Presence) -> None:
        """A new retained status (the partitions changed), published now when connected.

        It is also the one of the next connect and of the stop. The will set at connect keeps
        the old body until the next connect (MQTT cannot change a will): the broker publishes
        it only when the bridge dies, with `"state": "offline"`.
        """
        self.session = dataclasses.replace(self.session, presence=presence)
        if self._reading() is not None:
            self._announce(online=True)

    def hold(self, on: bool) -> None:
        """Commit nothing while on (an operation owns the store); off: commit what was held."""
        self._held = on
        reader = self._reading()
        if not on and reader is not None:
            if self.sink is not None and self.sink.has_work:
                self.commit_or_hold(reader)  # resumes reading once it is stored
            elif not self.stall.active:
                reader.resume()

    async def settled(self) -> None:
        """Until the commit in flight, if any, is settled: the loop reads on meanwhile.

        The worker's commit is awaited; `_committed`, its done callback, settles it first (a
        failure starts the stall). For the bridge's operations, with commits held: no other
        starts after it.
        """
        sink, done = self.sink, self._commit_done
        if sink is not None and sink.committing and done is not None:
            await asyncio.wait([done])

    async def commit_held(self) -> None:
        """Store what is held and acknowledge it, while an operation holds commits.

        One commit in the worker thread, as any other (the loop reads on meanwhile); the hold is
        on again before it returns, so no commit follows it into the operation. A failure starts
        the stall, as always. Nothing happens without a connection to acknowledge on: what is
        held waits for the operation's end.
        """
        reader = self._reading()
        if reader is None or self.sink is None:
            return
        self._held = False
        try:
            self.commit_or_hold(reader)
        finally:
            self._held = True
        await self.settled()

    # ---- reconnecting and shutting down -------------------------------------------------------

    def _connection_lost(self, why: str) -> None:
        if self._connected:
            self._connected = False
            self._hooks.disconnected(why)

    async def _reconnect(self, sink: PipelinedSink, stop: threading.Event) -> None:
        """Reconnect with exponential backoff and jitter until it works or `stop` is set."""
        self._connected = False
        await self._drop()
        # Acks of the closed connection are void (a packet id means nothing on another one).
        # Its messages stay held: the broker resends only those whose expiry has not passed.
        sink.drop_tokens(lambda _token: False)
        backoff = Backoff()
        while not stop.is_set():
            if not self._room_for_a_connection(sink):
                self._hooks.tick()
                await sleep_unless_stopped(max(self.stall.seconds_left(), 0.1), stop)
                continue
            try:
                # A broker that takes TCP and then says nothing holds a handshake for its whole
                # timeout: a stop must not wait for that (SIGTERM took up to ~15 s).
                if await unless_stopped(self._connect(sink, self.filters), stop) is None:
                    return
            except (OSError, BrokerError) as exc:  # ssl.SSLError is an OSError
                delay = backoff.next()
                said = (
                    exc.message()  # names the broker (it said "broker X unreachable (...X...)")
                    if isinstance(exc, BrokerError)
                    else f"cannot reach the broker: {self.session.address}: {describe(exc)}"
                )
                log.warning("%s; retrying in %.1fs", said, delay)
                self._hooks.tick()  # operations and bookkeeping go on while the broker is away
                await sleep_unless_stopped(delay, stop)
                continue
            log.info("reconnected to %s", self.session.address)
            return

    def _room_for_a_connection(self, sink: PipelinedSink) -> bool:
        """Whether the sink can take the window a new connection brings (retrying storage first).

        Held copies are never dropped, so during a storage stall each connection may add one
        broker window to them; connecting only while there is room keeps what is held bounded.
        """
        if not sink.can_hold() and self.stall.seconds_left() == 0 and not self._held:
            try:
                commit_now(sink)
            except StorageUnavailable as exc:
                self.stall.failed(exc)
            else:
                self.stall.cleared()
        return sink.can_hold()

    async def _shutdown(self, sink: PipelinedSink) -> None:
        """Stop reading, store what is pending, send its acks, disconnect, let the broker close."""
        reader = self._reading()
        if not self._connected or reader is None:
            self._connected = False
            await self._drop()
            # Keep what was received on the lost connection: storing it twice is safe.
            try:
                commit_now(sink)
            except StorageUnavailable as exc:
                log.warning("storage still failing while disconnected: %s", exc.detail)
            return
        reader.pause()
        try:
            commit_now(sink)
        except StorageUnavailable as exc:
            log.error(
                "could not store %d pending messages at shutdown (not acknowledged: the "
                "broker resends those that have not expired): %s",
                sink.pending,
                exc.detail,
            )
        self._connected = False  # a disconnect we asked for is not a lost connection
        await self._goodbye()


def commit_now(sink: PipelinedSink) -> int:
    """Commit on the loop: the commit in flight first, then a fresh try at everything held.

    StorageUnavailable when that try fails; a commit in flight that failed just holds again.
    """
    with contextlib.suppress(StorageUnavailable):
        sink.settle()
    return sink.commit()


async def unless_stopped(work: Coroutine[Any, Any, _T], stop: threading.Event) -> _T | None:
    """`work`'s result; None when `stop` is set first (then `work` is cancelled, and has ended)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            if stop.is_set():
                task.cancel()
                await asyncio.wait({task})
                if not task.cancelled():
                    task.exception()  # looked at: asyncio does not log it as never retrieved
                return None
            await asyncio.wait({task}, timeout=TICK_S)
    except BaseException:
        task.cancel()  # we were cancelled ourselves: take the work down with us
        raise
    return task.result()


async def sleep_unless_stopped(seconds: float, stop: threading.Event) -> None:
    """Sleep, but wake within a tick when `stop` is set (a threading event: polled)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while not stop.is_set() and (left := until - loop.time()) > 0:
        await asyncio.sleep(min(left, TICK_S))
