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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mqtt_backup
from mqtt_backup.config import BrokerAddress
from mqtt_backup.errors import ClientIdInUse
from mqtt_backup.mqtt import CodecConnection, Delivery, TlsFiles
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
    identity: Identity, partitions: list[str], keepalive: int, started_ns: int
) -> dict[str, Any]:
    """The online status body (the will is the same with `"state": "offline"`)."""
    return {
        "state": ONLINE,
        "protocol": STATUS_PROTOCOL,
        "version": mqtt_backup.__version__,
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
            batch = await asyncio.wait_for(conn.receive(), left)
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
    address: BrokerAddress,
    identity: Identity,
    keepalive: int,
    *,
    protocol: str = "5",
    tls_files: TlsFiles | None = None,
) -> None:
    """Return once no running bridge holds our client id; ClientIdInUse after 1.5 keepalives.

    A bridge that crashed is offline by then: the broker publishes its will once it misses
    1.5 keepalives (at once when the socket closed, as after a kill -9).
    """
    async with CodecConnection(address, protocol=protocol, tls_files=tls_files) as conn:
        members = await read_members(conn, identity.namespace)
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
                update_members(
                    identity.namespace, members, await asyncio.wait_for(conn.receive(), left)
                )


def _in_use(identity: Identity, other: Member) -> ClientIdInUse:
    where = f"{other.body.get('host', '?')} pid {other.body.get('pid', '?')}"
    return ClientIdInUse(
        f"{identity.client_id} is online on {other.topic} (started "
        f"{other.body.get('started', '?')} on {where}), and two connections with one client id "
        "take the broker session from each other",
        "stop the other bridge, or give this one its own --instance (or --client-id) "
        "and its own --data directory",
    )
