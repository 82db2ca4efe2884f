"""Membership over the broker: each bridge's retained status, its last will, and who is online.

Every running bridge keeps a retained JSON message on
`<namespace>/status/<group or "default">/<instance or client id>` (shared/DESIGN.md section 6):
`"state": "online"` while it runs, and a last will that replaces it with `"state": "offline"` when
its connection dies; a clean stop publishes `offline` itself. Restore clients read the live
members from there, and a starting bridge reads it to avoid taking the session of a running one
(two connections with one client id take it from each other in a loop, DESIGN section 8).

`protocol` in the message is the version of what the bridge speaks beyond DESIGN section 4, so a
newer client can tell what an older bridge understands: absent (0) = no status at all (a bridge
from before scale-out), 1 = answers carry `instance` in a group, requests may carry `group`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mqtt_backup
from mqtt_backup.config import BrokerTarget
from mqtt_backup.errors import BrokerError, ClientIdInUse
from mqtt_backup.mqtt import CodecConnection, Delivery
from mqtt_backup.restore.request import PROTOCOL
from mqtt_backup.times import format_ts
from mqtt_backup.topics import DEFAULT_GROUP, status_topic

log = logging.getLogger(__name__)

STATUS_PROTOCOL = PROTOCOL  # one version for the status message and the restore terminals
ONLINE, OFFLINE = "online", "offline"
# After the barrier (see `read_members`), how long stragglers may still come (brokers that
# queue retained messages behind a later SUBACK).
GRACE_S = 0.1
# A bridge whose connection died is offline once the broker notices: at most 1.5 keepalives.
WILL_WITHIN_KEEPALIVES = 1.5


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a bridge is on the status topic."""

    namespace: str
    client_id: str
    group: str | None = None
    instance: str | None = None

    @property
    def name(self) -> str:
        """Its name in the group: the instance, or the client id."""
        return self.instance or self.client_id

    @property
    def topic(self) -> str:
        """Its status topic."""
        return status_topic(self.namespace, self.group, self.name)


def announcement(
    identity: Identity, partitions: list[str], keepalive: int, started_ns: int, mqtt: str = "5"
) -> dict[str, Any]:
    """The online status body (the will is the same with `"state": "offline"`).

    `mqtt`: the MQTT version the bridge reads on ("5" or "3.1.1"): a group replay needs 5, where
    the replay mark is seen.
    """
    return {
        "state": ONLINE,
        "protocol": STATUS_PROTOCOL,
        "version": mqtt_backup.__version__,
        "mqtt": mqtt,
        "group": identity.group or DEFAULT_GROUP,
        "instance": identity.name,
        "client_id": identity.client_id,
        "partitions": partitions,
        "started": format_ts(started_ns),
        "requests": f"{identity.namespace}/restore/+",
        "keepalive": keepalive,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def encode(body: Mapping[str, Any], state: str) -> bytes:
    """The retained payload of `body` in `state`."""
    return json.dumps({**body, "state": state}, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True, slots=True)
class Member:
    """One bridge as its status message describes it."""

    topic: str
    group: str
    name: str
    body: dict[str, Any]

    @property
    def online(self) -> bool:
        """Whether it said it is online (and its will has not replaced that)."""
        return self.body.get("state") == ONLINE

    @property
    def client_id(self) -> str | None:
        """Its MQTT client id, when it said."""
        value = self.body.get("client_id")
        return value if isinstance(value, str) else None

    @property
    def mqtt5(self) -> bool:
        """Whether it reads on MQTT 5 (and so sees the replay mark); a status without says so."""
        return str(self.body.get("mqtt", "5")) == "5"

    @property
    def protocol(self) -> int:
        """What it speaks beyond DESIGN section 4 (see the module docstring)."""
        value = self.body.get("protocol")
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    @property
    def keepalive(self) -> float | None:
        """Its keepalive in seconds, when it said."""
        value = self.body.get("keepalive")
        return float(value) if isinstance(value, int | float) and value > 0 else None

    def stale_here(self) -> bool:
        """An `online` left by a process of this machine that is gone (its will never came)."""
        pid = self.body.get("pid")
        if self.body.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # it exists (another user's): not ours to call stale
        return False

    def row(self) -> dict[str, Any]:
        """What `mqtt-backup status --json` prints: the body, with the topic."""
        return {"topic": self.topic, **self.body}


def parse_member(namespace: str, topic: str, payload: bytes) -> Member | None:
    """The member a status message describes; None for a cleared or foreign message."""
    levels = topic.split("/")
    own = namespace.split("/")
    if len(levels) != len(own) + 3 or levels[: len(own) + 1] != [*own, "status"]:
        return None
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("state"), str):
        return None
    return Member(topic, levels[-2], levels[-1], body)


# ---- reading the status topic -------------------------------------------------------------------


def status_filter(namespace: str, group: str | None = None) -> str:
    """The filter of every bridge's status (of one group)."""
    return f"{namespace}/status/{group or '+'}/+"


async def read_members(
    conn: CodecConnection, namespace: str, wait: float | None = None
) -> dict[str, Member]:
    """The members announced on the status topic, by topic (the connection stays subscribed).

    `wait` None: until the retained messages are in (a second SUBSCRIBE, which sends none, is
    answered after them), plus a short grace; otherwise for `wait` seconds.
    """
    topic_filter = status_filter(namespace)
    await conn.subscribe([topic_filter], qos=0)
    if wait is None:
        await conn.subscribe([topic_filter], qos=0, retain_handling=2)
    members: dict[str, Member] = {}
    await take_members(conn, namespace, members, GRACE_S if wait is None else wait)
    return members


async def take_members(
    conn: CodecConnection, namespace: str, members: dict[str, Member], seconds: float
) -> list[Delivery]:
    """Update `members` from what arrives within `seconds`; returns the other deliveries."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    others: list[Delivery] = []
    while (left := until - loop.time()) > 0:
        try:
            batch = await _receive_within(conn, left)
        except TimeoutError:
            break
        others.extend(update_members(namespace, members, batch))
    return others


def update_members(
    namespace: str, members: dict[str, Member], batch: list[Delivery]
) -> list[Delivery]:
    """Apply the status messages of `batch` to `members`; returns the other deliveries."""
    others = []
    prefix = f"{namespace}/status/"
    for delivery in batch:
        if not delivery.topic.startswith(prefix):
            others.append(delivery)
            continue
        member = parse_member(namespace, delivery.topic, delivery.payload)
        if member is None:
            members.pop(delivery.topic, None)  # cleared (an empty retained publish)
        else:
            members[delivery.topic] = member
    return others


def holder(members: Mapping[str, Member], client_id: str) -> Member | None:
    """The live member that holds `client_id`, if any (a stale one of this machine is not)."""
    for member in members.values():
        if member.online and member.client_id == client_id and not member.stale_here():
            return member
    return None


async def wait_for_client_id(
    target: BrokerTarget,
    identity: Identity,
    keepalive: int,
) -> None:
    """Return once no running bridge holds our client id; ClientIdInUse after 1.5 keepalives.

    A bridge that crashed is offline by then: the broker publishes its will once it misses
    1.5 keepalives (at once when the socket closed, as after a kill -9).
    """
    async with CodecConnection(target) as conn:
        members = await read_members(conn, identity.namespace)
        await _wait_while_held(conn, identity, members, keepalive)


async def _wait_while_held(
    conn: CodecConnection, identity: Identity, members: dict[str, Member], keepalive: int
) -> None:
    other = holder(members, identity.client_id)
    if other is None:
        return
    patience = WILL_WITHIN_KEEPALIVES * (other.keepalive or keepalive)
    log.warning(
        "client id %s is online on %s; waiting up to %.0f s for it to go offline",
        identity.client_id,
        other.topic,
        patience,
    )
    loop = asyncio.get_running_loop()
    until = loop.time() + patience
    while (other := holder(members, identity.client_id)) is not None:
        if (left := until - loop.time()) <= 0:
            raise _in_use(identity, other)
        with contextlib.suppress(TimeoutError):
            update_members(identity.namespace, members, await _receive_within(conn, left))


async def _receive_within(conn: CodecConnection, seconds: float) -> list[Delivery]:
    """The next deliveries, or TimeoutError after `seconds`.

    Not `asyncio.wait_for`: on Python 3.11 it returns the result, and swallows a cancellation,
    when both come at once (cpython gh-86296), and a cancelled check then waited for ever.
    """
    async with asyncio.timeout(seconds):
        return await conn.receive()


async def _listen_until(
    conn: CodecConnection, namespace: str, members: dict[str, Member], until: asyncio.Event
) -> None:
    """Apply what arrives to `members` until `until` is set."""
    told = asyncio.ensure_future(until.wait())
    try:
        while not told.done():
            receiving = asyncio.ensure_future(conn.receive())
            try:
                await asyncio.wait({receiving, told}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                receiving.cancel()
            if receiving.done() and not receiving.cancelled():
                update_members(namespace, members, receiving.result())
    finally:
        told.cancel()


async def _catch_up(conn: CodecConnection, namespace: str, members: dict[str, Member]) -> None:
    """Apply every status the broker sent before now.

    A SUBSCRIBE that sends nothing (retain handling 2) is answered after them, as in
    `read_members`; then what the connection holds is taken without waiting for more.
    """
    await conn.subscribe([status_filter(namespace)], qos=0, retain_handling=2)
    while True:
        receiving = asyncio.ensure_future(conn.receive())
        await asyncio.sleep(0)  # one step: it returns at once when deliveries are waiting
        if not receiving.done():
            receiving.cancel()
            return
        update_members(namespace, members, receiving.result())


CANCEL_AGAIN_S = 0.5  # how long `ClientIdCheck.cancel` waits before asking again


class ClientIdCheck:
    """`wait_for_client_id` started ahead, on a thread of its own, while the bridge opens its store.

    The retained statuses and the grace after them (one broker connection, ~0.1 s) then overlap
    the store's opening instead of following it. The statuses are kept up to date until
    `result()`, which decides as `wait_for_client_id` does, for that moment: its warning and its
    patience start then, and a bridge that came online in between is waited for. Should the
    connection drop in between, `result()` runs the whole check again.
    """

    def __init__(
        self,
        target: BrokerTarget,
        identity: Identity,
        keepalive: int,
    ) -> None:
        self.identity = identity
        self._target, self._keepalive = target, keepalive
        self.read = threading.Event()  # the retained statuses are in
        self._loop = asyncio.new_event_loop()
        self._until = asyncio.Event()
        self._task = self._loop.create_task(self._check())
        self._thread = threading.Thread(target=self._main, name="client-id-check", daemon=True)
        self._thread.start()

    async def _check(self) -> None:
        namespace = self.identity.namespace
        try:
            async with CodecConnection(self._target) as conn:
                members = await read_members(conn, namespace)
                self.read.set()
                await _listen_until(conn, namespace, members, self._until)
                await _catch_up(conn, namespace, members)
                await _wait_while_held(conn, self.identity, members, self._keepalive)
                return
        except BrokerError:
            if not self._until.is_set() or not self.read.is_set():
                # The broker cannot be reached, or never answered: the same error as checking
                # at connect (asking again would only double the wait for a silent broker).
                raise
        await wait_for_client_id(self._target, self.identity, self._keepalive)

    def _main(self) -> None:
        with contextlib.suppress(BaseException):  # the outcome is the task's: `result()` says
            self._loop.run_until_complete(self._task)
        if self._task.done() and not self._task.cancelled():
            self._task.exception()  # looked at: asyncio does not log it as never retrieved
        self._loop.close()

    def result(self) -> None:
        """Wait for the check to pass as of now; its error (ClientIdInUse, BrokerError) if not."""
        with contextlib.suppress(RuntimeError):  # the loop is done already
            self._loop.call_soon_threadsafe(self._until.set)
        self._thread.join()
        self._task.result()

    def cancel(self) -> None:
        """Stop it (the bridge failed to start); its connection closes.

        Asked again until the thread ends: a cancellation that lands while a library call
        finishes can be swallowed by it, and one lost request must not hang the failed start.
        """
        while self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop is closed: the thread is ending
                self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(CANCEL_AGAIN_S)


def _in_use(identity: Identity, other: Member) -> ClientIdInUse:
    where = f"{other.body.get('host', '?')} pid {other.body.get('pid', '?')}"
    return ClientIdInUse(
        f"{identity.client_id} is online on {other.topic} (started "
        f"{other.body.get('started', '?')} on {where}), and two connections with one client id "
        "take the broker session from each other",
        "stop the other bridge, or give this one its own --instance (or --client-id) "
        "and its own --data directory",
    )
