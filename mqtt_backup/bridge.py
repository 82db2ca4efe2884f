"""The running bridge: storage, ingest transport and commit pipeline, started and stopped in order.

It also keeps the books: the gap log, the state file and the periodic rate line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from mqtt_backup import logs, metrics, operations, status
from mqtt_backup.config import ResponseTopics, Settings
from mqtt_backup.control import AsyncControlServer
from mqtt_backup.errors import BackupError, OperationStopped, StorageError, StorageUnavailable
from mqtt_backup.ingest import CommitPipeline, PipelineStore
from mqtt_backup.mqtt import AsyncIngest, Session
from mqtt_backup.mqtt.session import Presence
from mqtt_backup.restore import DroppedWatcher, RestoreService, ServeOptions, serve
from mqtt_backup.startup import Startup, start_check
from mqtt_backup.startup import identity as startup_identity
from mqtt_backup.storage import LiveReader, maintenance
from mqtt_backup.storage.journal import BridgeState, Gap
from mqtt_backup.storage.units import Units, step
from mqtt_backup.times import NS_PER_S, parse_duration
from mqtt_backup.topics import Router, shared

if TYPE_CHECKING:
    from mqtt_backup.mqtt import PahoIngest

log = logging.getLogger(__name__)
_R = TypeVar("_R")
_Transport: TypeAlias = "AsyncIngest | PahoIngest"

STATE_EVERY_S = 5.0
# A session-lost gap starts this long before the bridge's last caught-up moment: a message a
# device published just before it may still have been inside the broker (received, not yet sent
# to the bridge; milliseconds, more under load) and went with the session.
GAP_LEAD_NS = NS_PER_S
RATE_LOG_EVERY_S = 30.0
RETENTION_EVERY_S = 3600.0
# A scrape walks the partitions' files at most this often (a scraper polling every few ms, as the
# bench's restart scenario does, would otherwise keep a core busy with directory walks).
DISK_BYTES_EVERY_S = 1.0
# Where earlier releases kept the restore reader's scratch space: removed when found.
OLD_RESTORE_SCRATCH = ".restore-reader"


@dataclass(slots=True)
class _Clock:
    state_at: float = -STATE_EVERY_S  # first save at the first tick
    rate_at: float = 0.0
    rate_stored: int = 0
    retention_at: float = -RETENTION_EVERY_S  # first pass right after start
    state_failing: bool = False


class Bridge:
    """Ingest into the store until stopped. `stop()` is the one call safe from outside."""

    def __init__(
        self,
        settings: Settings,
        wrap_store: Callable[[PipelineStore], PipelineStore] | None = None,
        startup: Startup | None = None,
    ) -> None:
        """`wrap_store` wraps the store the pipeline writes to (tests inject faults with it).

        `startup`: the store and the client-id check, begun while `run` imported this module.
        """
        self.settings = settings
        self._stop = threading.Event()
        self._stop_asked = False  # see `stop`
        self.restore_listening = threading.Event()
        # The store and the client-id check, side by side (docs/design-notes.md, "Start-up").
        if startup is None:
            startup = Startup(settings)
            startup.check_client_id()
        self.store = startup.store()  # on failure, it cancels the check itself
        self._client_id_check: status.ClientIdCheck | None = None
        self._started_ns = time.time_ns()
        self._clock = _Clock()
        self._stop_metrics: Callable[[], None] = lambda: None
        self._acknowledged = 0
        self._connections = 0
        self._dropped: DroppedWatcher | None = None  # set by the restore service
        self._one_operation: asyncio.Lock | None = None  # made on the loop
        self._operating = False  # an operation owns the store (tick leaves it alone)
        self._background: set[asyncio.Task[None]] = set()  # retention passes beside ingest
        self._disk_bytes: tuple[float, dict[str, int]] | None = None  # when read, what
        try:
            # From the store's open on, a failure lets go of it (and its lock) and of the check.
            self._router = Router(settings.templates, settings.namespace)
            self.identity = startup_identity(settings, self.store.client_id)
            self._client_id_check = startup.take_check(self.identity)
            self._state = BridgeState.load(settings.data)
            self.store.gaps.all()  # a corrupt gap log is a start-up error, not a later one
            self._transport = self._make_transport()
            self.pipeline = CommitPipeline(
                wrap_store(self.store) if wrap_store else self.store,
                self._router,
                self._ack,
                batch_max=settings.batch_max,
                batch_ms=settings.batch_ms,
            )
        except BaseException:
            startup.cancel_check()
            self._cancel_client_id_check()
            self.store.discard_new()
            raise
        # Until this run catches up, what the last run knew holds (a gap never starts later).
        self.pipeline.caught_up(self._state.last_alive_ns)

    def _make_transport(self) -> _Transport:
        # asyncio + mqtt5 is the fast path (docs/design-notes.md); paho is 3.1.1 and the fallback.
        kind = self.settings.transport or ("asyncio" if self.settings.protocol == "5" else "paho")
        filters = [shared(f, self.settings.group) for f in self._router.filters]
        if kind == "asyncio":
            return AsyncIngest(self._session(), filters, self)
        from mqtt_backup.mqtt import PahoIngest  # noqa: PLC0415 - paho loads only for its transport

        return PahoIngest(self._session(), filters, self)

    def _session(self) -> Session:
        s = self.settings
        return Session(
            target=s.broker_target,
            client_id=self.store.client_id,
            keepalive=s.keepalive,
            session_expiry=s.session_expiry,
            receive_maximum=min(65535, max(s.batch_max, 100)),
            presence=self._presence(),
        )

    def _presence(self) -> Presence:
        body = status.announcement(
            self.identity,
            [spec.name for spec in self.store.manifest.partitions],
            self.settings.keepalive,
            self._started_ns,
            self.settings.protocol,
        )
        return Presence(
            self.identity.topic,
            status.encode(body, status.ONLINE),
            status.encode(body, status.OFFLINE),
        )

    def _wait_for_client_id(self) -> None:
        """Do not take the session of a bridge that runs with our client id (see status.py)."""
        check, self._client_id_check = self._client_id_check, None
        if check is None:  # a second connect(): check again
            check = start_check(self.settings, self.store.client_id)
        check.result()

    def _cancel_client_id_check(self) -> None:
        check, self._client_id_check = self._client_id_check, None
        if check is not None:
            check.cancel()

    def connect(self) -> None:
        """Connect and subscribe (and serve metrics when asked); BrokerError, UsageError."""
        try:
            if (where := self.settings.metrics_address) is not None:
                self._stop_metrics = metrics.serve(where[1], self.snapshot, host=where[0])
            self._wait_for_client_id()
            self._transport.connect(self.pipeline, self._state.subscriptions)
            self.store.keep_client_id()
        except BaseException:
            # Bad input changes nothing: a data directory made by this failed start goes again.
            self._cancel_client_id_check()
            self._stop_metrics()
            self.store.discard_new()
            raise

    def run(self) -> None:
        """Ingest until `stop()`; then store what is pending, acknowledge it and close."""
        s = self.settings
        log.info(
            "mqtt-backup running: broker %s, data %s, %s, client id %s, topics %s",
            s.broker_address,
            s.data,
            logs.count(len(self.store.manifest.partitions), "partition"),
            self.store.client_id,
            ", ".join(s.topic),
        )
        restore = RestoreSide(
            self.settings,
            self.store.client_id + "-restore",
            LiveReader(self.store),
            self.restore_listening,
            self,
            instance=self.identity.name,
        )
        try:
            self._run_on_one_loop(self._transport, restore)
        finally:
            self._save_state()
            self.store.close()
            self._stop_metrics()
            stored = logs.count(self.pipeline.counters.stored, "message")
            log.info("stopped: %s stored this run", stored)

    def _run_on_one_loop(self, transport: _Transport, restore: RestoreSide) -> None:
        """Ingest, restore and the control socket as tasks of the transport's event loop.

        Both transports run one (paho through its external-loop API): no thread of the bridge's
        own but the metrics server, and workers for what blocks (commits, operations).
        """
        control = AsyncControlServer(self.settings.data, self._operate)
        control.bind()
        try:
            transport.run(self.pipeline, self._stop, beside=_LoopServices(self, restore, control))
        finally:
            control.stop()

    def snapshot(self) -> metrics.Snapshot:
        """The bridge's counters and state right now (for /metrics)."""
        c = self.pipeline.counters
        return metrics.Snapshot(
            stored=c.stored,
            skipped=c.skipped,
            duplicates=c.duplicates,
            batches=c.batches,
            payload_bytes=c.bytes,
            commit_seconds=c.commit_seconds,
            pending=self.pipeline.pending,
            connected=self._transport.connected,
            storage_stalled=self._transport.stall.active,
            gaps=self._gaps_count(),
            received=c.received,
            acknowledged=self._acknowledged,
            reconnects=max(0, self._connections - 1),
            partition_bytes=self._partition_bytes(),
            broker_dropped=self._dropped.dropped if self._dropped is not None else None,
            write_seconds=self.pipeline.write_seconds(),
        )

    def _partition_bytes(self) -> dict[str, int]:
        # The files on disk, not the store's handles: a scrape runs on another thread.
        now = time.monotonic()
        read = self._disk_bytes
        if read is not None and now - read[0] < DISK_BYTES_EVERY_S:
            return read[1]
        sizes = {
            spec.name: _tree_bytes(spec.directory(self.settings.data))
            for spec in self.store.manifest.partitions
        }
        self._disk_bytes = (now, sizes)
        return sizes

    def _ack(self, tokens: Sequence[Any]) -> None:
        self._transport.ack(tokens)
        self._acknowledged += len(tokens)

    def _gaps_count(self) -> int:
        try:
            return len(self.store.gaps.all())
        except StorageError:
            return -1

    def stop(self) -> None:
        """Ask the bridge to stop (safe from a signal handler or another thread)."""
        # A second signal's handler can run inside the first's Event.set, which holds the
        # event's lock, and would wait for it forever (Ctrl-C in `make run`: the terminal's
        # SIGINT, then the script's SIGTERM). The first call sets the event; later ones add
        # nothing.
        if self._stop_asked:
            return
        self._stop_asked = True
        self._stop.set()

    # ---- hooks the transport calls -----------------------------------------------------------

    def connected(self, session_present: bool, subscribed: Sequence[str]) -> None:
        """Record a gap when the broker lost our session (it dropped what it held for us)."""
        now = time.time_ns()
        self._connections += 1
        had_session = bool(self._state.subscriptions)
        if not session_present and had_session:
            # From the last moment the bridge had everything: what the broker queued after it
            # (a backlog, or publishes during a shutdown) went with the session.
            caught_up = self.pipeline.caught_up_ns or now
            downtime = (now - caught_up) / NS_PER_S
            since = caught_up - GAP_LEAD_NS
            reason = "downtime" if downtime > self.settings.session_expiry else "session-lost"
            log.warning(
                "the broker has no session for %s: messages published since %s may be lost "
                "(recorded as a %s gap). Enable persistence on the broker to avoid this.",
                self.store.client_id,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since / NS_PER_S)),
                reason,
            )
            self._record_gap(Gap(since, now, reason))
        if not session_present:
            # A new session had nothing queued before its connection was opened.
            self.pipeline.caught_up(self.pipeline.connecting_ns)
        if list(subscribed) != self._state.subscriptions:
            # Saved before anything is stored: a start that finds no session records a gap only
            # when the state file says there was one. Otherwise the first tick saves it (off the
            # way to the first commit: a restart's state file already says all this, and a
            # caught-up time that is older only widens a gap). docs/design-notes.md, "Start-up".
            self._state.subscriptions = list(subscribed)
            self._save_state()

    def disconnected(self, reason: str) -> None:
        """Note when the connection dropped; the transport reconnects by itself."""
        log.warning("lost the broker connection (%s); reconnecting", reason)

    def _announce_layout(self) -> None:
        """After an operation: the retained status names the partitions there are now."""
        presence = self._presence()
        if presence != self._transport.session.presence:
            self._transport.announce(presence)

    async def _before_units(self, transport: _Transport, frees_space: bool) -> None:
        """Commit what is pending first (it goes where the current layout says), loop left free.

        Not when storage fails or the disk is full (`_ready_without_commit`). The commit in
        flight in the transport's worker thread is awaited, then what is pending is committed
        there too (`commit_held`); the transport settles both, and a failure starts the stall
        (the operation then runs as on a stalled bridge). Whatever opens or releases room runs
        in a worker thread as well. Commits are held already: none starts meanwhile.
        """
        await transport.settled()
        if await self._in_worker(self._ready_without_commit, frees_space, transport.stall.active):
            return
        await transport.commit_held()
        if transport.stall.active:  # that commit failed: run as on a stalled bridge
            await self._in_worker(self._ready_without_commit, frees_space, True)

    def _ready_without_commit(self, frees_space: bool, stalled: bool) -> bool:
        """Whether the operation runs without a commit first; if so, the store is ready for it.

        On a full disk, or while ingest is stalled on storage, a commit would fail (and fail the
        operation with it) or take the room that a prune or forget frees: what is pending is
        held instead, placed again and stored after the operation as usual. A deleting
        operation then owns the room: the ballast is released for it, and no ingest commit runs
        until its reclaim is done and compactions are on again (`Store.done_freeing`).
        """
        full = frees_space and self.store.make_room(stalled=stalled)
        if full or stalled:
            self.store.ensure_open()  # a failed write closed them: reopen before operating
            return True
        return False

    @staticmethod
    async def _in_worker(work: Callable[..., _R], *args: object) -> _R:
        return await _to_thread_to_the_end(functools.partial(work, *args), "preparing the store")

    def _may_commit_between_units(self, stalled: bool) -> bool:
        """Place what is held again; whether a commit may come between two units now.

        Not while storage fails (the stall retries after the operation) nor while a deleting
        operation owns the room it frees on a full disk. A commit that fails there fails the
        operation, as its own write would: the handles are closed, and a re-run finishes it.
        """
        self.pipeline.regroup()  # the unit may have switched the layout
        return not (stalled or self.store.freeing_space)

    async def _operate(self, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """An operation from the control socket, on the loop; its start and end are logged."""
        work = operations.units(self.store, op, args)
        log.info("%s asked over the control socket: running it beside ingest", op)
        started = time.monotonic()
        try:
            done = await self._beside_ingest(op, work, operations.frees_space(op, args))
        except BackupError as exc:
            log.warning("%s ended after %.1f s: %s", op, time.monotonic() - started, exc.message())
            raise
        log.info("%s done in %.1f s", op, time.monotonic() - started)
        return done

    async def _beside_ingest(self, what: str, work: Units[_R], frees_space: bool) -> _R:
        """Run a long operation's units in a worker thread, committing between them.

        Operations run one at a time, between two commits: no commit starts while one runs
        (`AsyncIngest.hold`), the commit in flight is awaited and what is pending committed
        first (`_before_units`); what arrives meanwhile is held within the broker's window,
        reading paused when the hold is full. Between two units it is placed again (a unit may
        have switched the layout), stored and acknowledged (`_between_units`). The loop keeps
        the connection and answers restores meanwhile (docs/design-notes.md).
        """
        transport = self._transport
        if self._one_operation is None:
            self._one_operation = asyncio.Lock()
        async with self._one_operation:
            if self._stop.is_set():
                raise BackupError("the bridge is stopping; run the command again")
            transport.hold(True)
            self._operating = True
            try:
                await self._before_units(transport, frees_space)
                while True:
                    done = await _to_thread_to_the_end(functools.partial(step, work), what)
                    if done is not None:
                        return done.result
                    if self._stop.is_set():
                        # Not to the end of a long move: a unit boundary is a safe place to stop
                        # (as for a kill -9 there), and a re-run finishes the operation.
                        raise OperationStopped(what)
                    await self._between_units(transport)
            finally:
                work.close()  # cancelled between units (a retention pass at a stop): it ends there
                self._operating = False
                self.pipeline.regroup()
                transport.hold(False)
                self._announce_layout()

    async def _between_units(self, transport: _Transport) -> None:
        """Store and acknowledge what arrived during the last unit, before the next one.

        Only when `_may_commit_between_units` says so; a failed commit fails the operation.
        """
        if not self._may_commit_between_units(transport.stall.active):
            return
        await transport.commit_held()
        if transport.stall.active:
            raise StorageUnavailable("a commit between two units of the operation failed")

    def tick(self) -> None:
        """Periodic work, called from the transport loop: state file, rate log, retention."""
        if self._operating:
            return  # the store is the operation's until it ends (the state file comes after it)
        now = time.monotonic()
        if now - self._clock.state_at >= STATE_EVERY_S:
            self._save_state()
        if now - self._clock.rate_at >= RATE_LOG_EVERY_S:
            self._log_rate(now)
        if now - self._clock.retention_at >= RETENTION_EVERY_S:
            self._clock.retention_at = now
            self._apply_retention()

    def _apply_retention(self) -> None:
        s = self.settings
        if s.prune_older_than is None and s.prune_max_bytes_per_device is None:
            return
        older = parse_duration(s.prune_older_than) if s.prune_older_than else None
        budget = s.prune_max_bytes_per_device
        # Beside ingest, in units, as an operation from the control socket is.
        units = maintenance.pruning(self.store, older, budget)
        task = asyncio.get_running_loop().create_task(self._retention(units))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _retention(self, work: Units[maintenance.Pruned]) -> None:
        try:
            pruned = await self._beside_ingest("retention", work, frees_space=False)
        except Exception as exc:  # noqa: BLE001 - one failed pass must not stop the bridge
            _retention_failed(exc)
            return
        _retention_done(pruned)

    async def _settle_operations(self) -> None:
        """At shutdown: retention passes are cancelled, and an operation under way ends first."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._one_operation is not None:
            async with self._one_operation:
                pass  # the bridge is stopping: operations after this one are refused

    def _log_rate(self, now: float) -> None:
        c = self.pipeline.counters
        if self._clock.rate_at:
            stored = c.stored - self._clock.rate_stored
            elapsed = now - self._clock.rate_at
            log.info(
                "ingest: %d msg in %.0fs (%.0f msg/s), %d total, %d redelivered copies, "
                "%d pending, %d skipped",
                stored,
                elapsed,
                stored / elapsed,
                c.stored,
                c.duplicates,
                self.pipeline.pending,
                c.skipped,
            )
        self._clock.rate_at, self._clock.rate_stored = now, c.stored

    def _save_state(self) -> None:
        self._clock.state_at = time.monotonic()
        self.store.keep_ballast()  # back once a full disk has room again
        if self.pipeline.caught_up_ns:
            self._state.last_alive_ns = self.pipeline.caught_up_ns
        try:
            self._state.save(self.settings.data)
        except StorageError as exc:
            # Once per failure episode: during a long storage stall this runs every few seconds.
            if not self._clock.state_failing:
                log.warning("could not save the bridge state (retrying): %s", exc.detail)
            self._clock.state_failing = True
            return
        if self._clock.state_failing:
            self._clock.state_failing = False
            log.warning("the bridge state is saved again")

    def _record_gap(self, gap: Gap) -> None:
        try:
            self.store.gaps.record(gap)
        except StorageError as exc:
            log.error("could not record a %s gap: %s", gap.reason, exc.detail)


class _LoopServices:
    """The restore side and the control socket as tasks of the ingest loop (`mqtt.Beside`)."""

    def __init__(self, bridge: Bridge, restore: RestoreSide, control: AsyncControlServer) -> None:
        self._bridge = bridge
        self._restore = restore
        self._control = control
        self._stop = asyncio.Event()
        self._serving: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """The restore service connects by itself; the control socket listens."""
        self._serving = asyncio.create_task(self._restore.serve(self._stop), name="restore.service")
        await self._control.start()

    async def settle(self) -> None:
        """No operation from now on, and the one under way (if any) ended."""
        self._control.stop()
        await self._bridge._settle_operations()

    async def stop(self) -> None:
        """After ingest's shutdown, as before: restores in progress are cancelled."""
        self._stop.set()
        if self._serving is not None:
            await self._serving


class RestoreSide:
    """The restore service with its own connection (`<id>-restore`), on whichever loop runs it."""

    def __init__(
        self,
        settings: Settings,
        client_id: str,
        reader: LiveReader,
        listening: threading.Event,
        bridge: Bridge | None = None,
        instance: str | None = None,
    ) -> None:
        self._settings = settings
        self._instance = instance or client_id
        self._listening = listening
        self._options = ServeOptions(settings.broker_target, client_id, settings.keepalive)
        self._reader = reader
        self._gaps = reader.store.gaps
        self._bridge = bridge  # told the dropped-counter watcher, for the metrics

    async def serve(self, stop: asyncio.Event) -> None:
        """Answer restore requests until `stop` is set; an unexpected error is logged."""
        try:
            await self._serve(stop)
        except Exception:
            log.exception("the restore service stopped on an unexpected error")

    async def _serve(self, stop: asyncio.Event) -> None:
        # The scratch space of an earlier version's secondary reader, if a kill -9 left it.
        shutil.rmtree(self._settings.data / OLD_RESTORE_SCRATCH, ignore_errors=True)
        address = self._settings.broker_address
        dropped = DroppedWatcher(self._gaps, self._settings.data, f"{address.host}:{address.port}")
        if self._bridge is not None:
            self._bridge._dropped = dropped
        service = RestoreService(
            self._reader,
            self._gaps,
            self._settings.namespace,
            any_response_topic=self._settings.response_topics == ResponseTopics.ANY,
            # Its last reading is kept in the data directory, so that what the broker
            # dropped while the bridge was away is a gap at the next start.
            dropped=dropped,
            group=self._settings.group,
            instance=self._instance,
            max_packet_size=self._settings.max_packet_size,
        )
        try:
            await serve(service, self._options, stop, self._set_listening)
        finally:
            self._reader.close()

    def _set_listening(self, up: bool) -> None:
        if up:
            self._listening.set()
        else:
            self._listening.clear()


def _retention_failed(exc: Exception) -> None:
    if isinstance(exc, OperationStopped):
        log.info("retention pass stopped with the bridge (the next start runs one)")
    elif isinstance(exc, BackupError):
        log.warning("retention pass failed (next one in an hour): %s", exc.message())
    else:
        log.error("retention pass failed (next one in an hour)", exc_info=exc)


def _retention_done(pruned: maintenance.Pruned) -> None:
    if pruned.messages:
        log.info(
            "retention: pruned %s (%s) of %s",
            logs.count(pruned.messages, "message"),
            logs.count(pruned.size, "byte"),
            logs.count(len(pruned.devices), "device"),
        )


async def _to_thread_to_the_end(work: Callable[[], _R], what: str) -> _R:
    """`work` in a worker thread; cancelled, it still waits for the thread (it owns the store).

    A failure that is not a BackupError (a bug) becomes one, logged with its traceback.
    """
    future = asyncio.get_running_loop().run_in_executor(None, work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise
    except BackupError:
        raise
    except Exception as exc:
        log.exception("%s failed", what)
        raise BackupError(f"{what} failed: {exc}") from exc


def _tree_bytes(directory: Path) -> int:
    """Bytes of the files in a directory tree (0 when it is gone, e.g. just removed)."""
    total = 0
    with contextlib.suppress(OSError):
        for item in directory.rglob("*"):
            with contextlib.suppress(OSError):
                total += item.stat().st_size if item.is_file() else 0
    return total
