"""Scatter-gather restore (shared/DESIGN.md section 6): ask every live instance, merge the streams.

The live members come from the status topic. The request names the group, so each instance
answers for what it holds with `instance` on every message and its own terminal. Each stream is
in stored order (receive time), so the streams are merged as they arrive: a message is written
once every stream still open has one waiting (or has ended), the earliest (or latest, for
`desc`) first. Every stored copy is kept: nothing is dropped on a guess. `limit` applies again
after the merge. The answer is complete when every member sent its terminal; a member silent
for `timeout` seconds is named, and what arrived is written.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mqtt_backup import jsontext
from mqtt_backup.errors import UsageError
from mqtt_backup.mqtt import REPLAY_PROPERTY, CodecConnection, Delivery
from mqtt_backup.records import Properties
from mqtt_backup.restore.client import Ask, LostOnTheWay, NoAnswer
from mqtt_backup.restore.request import Request
from mqtt_backup.status import STATUS_PROTOCOL, Member, read_members, update_members
from mqtt_backup.topics import DEFAULT_GROUP


@dataclass
class Stream:
    """One instance's answer: messages waiting to be merged, its seq check, its terminal."""

    name: str
    waiting: deque[dict[str, Any]] = field(default_factory=deque)
    received: int = 0
    missing: int = 0
    next_seq: int = 1
    terminal: dict[str, Any] | None = None

    def take(self, body: dict[str, Any]) -> None:
        """A stored message of this stream."""
        self.received += 1
        seq = body.get("seq")
        if isinstance(seq, int):
            self.missing += max(0, seq - self.next_seq)
            self.next_seq = seq + 1
        self.waiting.append(body)


@dataclass
class Gathered:
    """What a gathered restore found: each stream, who stayed silent, what was written."""

    streams: dict[str, Stream]
    silent: list[str]
    written: int = 0

    @property
    def answered(self) -> list[str]:
        """The instances whose terminal arrived."""
        return sorted(n for n, s in self.streams.items() if s.terminal is not None)

    @property
    def errors(self) -> dict[str, str]:
        """The instances that answered with an error terminal, and what they said."""
        return {
            n: str(s.terminal["error"])
            for n, s in sorted(self.streams.items())
            if s.terminal is not None and "error" in s.terminal
        }

    @property
    def gaps(self) -> list[dict[str, Any]]:
        """Every gap any instance reported for the window."""
        return [
            gap
            for s in self.streams.values()
            if s.terminal is not None
            for gap in s.terminal.get("gaps", [])
        ]


def choose_group(live: list[Member], wanted: str | None) -> list[Member]:
    """The members that answer: those of `wanted`, or of the one group online (UsageError)."""
    if wanted is not None:
        return [m for m in live if m.group == wanted]
    groups = sorted({m.group for m in live})
    if len(groups) > 1:
        raise UsageError(
            f"bridges of {len(groups)} groups are online ({', '.join(groups)}); each group holds "
            "a full copy",
            "choose one: " + " or ".join(f"--group {g}" for g in groups),
        )
    return live


async def gather(
    question: Ask,
    group: str | None,
    on_message: Callable[[dict[str, Any]], None],
    members: Callable[[list[Member]], None] = lambda _m: None,
    flush: Callable[[], None] = lambda: None,
    seen: Callable[[list[Member]], None] = lambda _m: None,
) -> Gathered | None:
    """Ask every live member of the group and merge; None when there is nothing to gather.

    `on_message` and `flush` as for `client.ask`: `flush` before each acknowledgement.

    None means: no bridge announced itself with scale-out support (an older bridge, or none), or
    one bridge without a group answers and the caller named no group: the caller asks the
    one-answer way (`client.ask`).
    `members` hears who will be asked; `seen` every member on the status topic, live or not.
    """
    request_id = uuid.uuid4().hex
    device = question.request.device
    request_topic = f"{question.namespace}/restore/{device}"
    async with CodecConnection(question.target) as conn:
        known = await read_members(conn, question.namespace)
        seen(list(known.values()))
        # A status without `protocol` is no bridge that can gather (bridges before scale-out
        # publish none): anyone may write one on a broker without the ACL, and taking it for an
        # old bridge would ask the one-answer way and mix the instances' answers.
        live = [m for m in known.values() if m.online and m.protocol >= STATUS_PROTOCOL]
        if not live:
            return None
        chosen = choose_group(live, group)
        if not chosen:
            raise NoAnswer(
                f"no bridge of group {group!r} is online",
                "mqtt-backup status lists the groups and their instances",
            )
        if group is None and len(chosen) == 1 and chosen[0].group == DEFAULT_GROUP:
            return None  # one bridge without a group: the one answer it always gave
        # A group named by the caller goes in the request, even `default`: a request without
        # one is answered by every bridge of every group.
        members(chosen)
        group_name = chosen[0].group
        request = dataclasses.replace(question.request, request_id=request_id, group=group_name)
        own_topic = f"{request_topic}/{request_id}" if conn.mqtt5 else f"{request_topic}/response"
        await conn.subscribe(list(dict.fromkeys((own_topic, f"{request_topic}/response"))), qos=1)
        props = Properties(response_topic=own_topic, correlation_data=request_id.encode())
        await conn.publish(request_topic, request.payload(), qos=1, props=props)
        merge = _Merge([m.name for m in chosen], request, on_message)
        await _read(conn, question, request_id, merge, known, flush)
    return merge.result()


async def _read(
    conn: CodecConnection,
    question: Ask,
    request_id: str,
    merge: _Merge,
    known: dict[str, Member],
    flush: Callable[[], None],
) -> None:
    loop = asyncio.get_running_loop()
    # The timeout is raised where the `async with` ends, so it is caught outside it.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(question.timeout) as deadline:
            while not merge.finished:
                batch = await conn.receive()
                for delivery in update_members(question.namespace, known, batch):
                    body = _body(delivery, request_id)
                    if body is not None:
                        merge.take(body)
                        # Only an answer pushes the deadline back: status traffic (anyone's,
                        # on a broker without the ACL) must not keep a silent member waited for.
                        deadline.reschedule(loop.time() + question.timeout)
                flush()
                conn.ack(batch)  # written or held in the merge: the broker may send more
    if merge.nothing_arrived():
        raise NoAnswer(
            f"nothing on {question.namespace}/restore/{question.request.device} from "
            f"{', '.join(sorted(merge.streams))} for {question.timeout:g} s",
            "check that 'mqtt-backup run' is connected to this broker, or raise --timeout",
        )


def _body(delivery: Delivery, request_id: str) -> dict[str, Any] | None:
    try:
        body = jsontext.loads(delivery.payload)
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("id") == request_id:
        return body
    return None


class _Merge:
    """Merges the streams as they arrive; writes each message once every open stream has one."""

    def __init__(
        self,
        names: list[str],
        request: Request,
        on_message: Callable[[dict[str, Any]], None],
    ) -> None:
        self.streams = {name: Stream(name) for name in names}
        self._descending = bool(request.descending)
        self._limit: int | None = request.limit
        self._on_message = on_message
        self._written = 0
        self._sent_any = False

    @property
    def finished(self) -> bool:
        """Every stream has its terminal."""
        return all(s.terminal is not None for s in self.streams.values())

    def nothing_arrived(self) -> bool:
        """Not one message or terminal came."""
        return not self._sent_any

    def take(self, body: dict[str, Any]) -> None:
        """One message or terminal of some stream (a stream not announced is kept too)."""
        self._sent_any = True
        name = str(body.get("instance") or "?")
        stream = self.streams.setdefault(name, Stream(name))
        if "done" in body or "error" in body:
            stream.terminal = body
        else:
            stream.take(body)
        self._flush(final=self.finished)

    def _flush(self, final: bool) -> None:
        while True:
            open_empty = any(s.terminal is None and not s.waiting for s in self.streams.values())
            if open_empty and not final:
                return
            ready = [s for s in self.streams.values() if s.waiting]
            if not ready:
                return
            pick = (max if self._descending else min)(ready, key=_order_key)
            body = pick.waiting.popleft()
            if self._limit is None or self._written < self._limit:
                self._written += 1
                self._on_message(body)

    def result(self) -> Gathered:
        """Write what is still waiting (a silent stream ends here) and say who answered."""
        self._flush(final=True)
        silent = sorted(n for n, s in self.streams.items() if s.terminal is None)
        for stream in self.streams.values():
            sent = stream.terminal.get("count") if stream.terminal else None
            if isinstance(sent, int) and sent > stream.received:
                raise LostOnTheWay(
                    f"{sent - stream.received} of {sent} messages from {stream.name} did not "
                    "arrive",
                    "raise the broker's max_queued_messages, or write to a faster output",
                )
        return Gathered(self.streams, silent, self._written)


def _order_key(stream: Stream) -> tuple[str, str, int]:
    head = stream.waiting[0]
    seq = head.get("seq")
    # RFC 3339 UTC with 9 fractional digits: text order is time order.
    return (str(head.get("ts", "")), stream.name, seq if isinstance(seq, int) else 0)


async def republish(question: Ask, bodies: list[dict[str, Any]], rate: float | None) -> int:
    """Replay gathered messages to their own topics, in order, at `rate` per second.

    As the bridge replays (DESIGN section 4): marked so that no bridge stores them again, the
    original receive time in `mqtt-backup-ts`, retain flags only with `retain` in the request.
    """
    interval = 1.0 / rate if rate else 0.0
    async with CodecConnection(question.target) as conn:
        for body in bodies:
            retain = question.request.retain and bool(body.get("retain"))
            await conn.publish(
                str(body["topic"]), _payload(body), int(body.get("qos", 1)), retain, _props(body)
            )
            if interval:
                await asyncio.sleep(interval)
    return len(bodies)


def _payload(body: dict[str, Any]) -> bytes:
    text = str(body.get("payload", ""))
    if body.get("encoding") == "base64":
        return base64.b64decode(text)
    return text.encode("utf-8")


def _props(body: dict[str, Any]) -> Properties:
    given = body.get("properties") or {}
    user = [(REPLAY_PROPERTY, "1"), ("mqtt-backup-ts", str(body.get("ts", "")))]
    user += [(str(k), str(v)) for k, v in given.get("user_properties", [])]
    correlation = given.get("correlation_data")
    return Properties(
        correlation_data=base64.b64decode(correlation) if correlation is not None else None,
        user=tuple(user),
        content_type=given.get("content_type"),
        payload_format=given.get("payload_format"),
        message_expiry=given.get("message_expiry"),
        response_topic=given.get("response_topic"),
    )
