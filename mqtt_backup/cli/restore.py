"""`mqtt-backup restore`: ask the bridges over MQTT for a device's history; JSON lines on stdout."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TextIO, TypeVar

import typer

from mqtt_backup import jsontext
from mqtt_backup.cli import output
from mqtt_backup.cli.options import (
    BrokerOpt,
    CaOpt,
    CertOpt,
    ConfigOpt,
    KeyOpt,
    NamespaceOpt,
    OutputOpt,
    ProtocolOpt,
    SinceOpt,
    TopicFilterOpt,
    UntilOpt,
    check_window,
    load_settings,
)
from mqtt_backup.cli.types import DEVICE_ID, RATE
from mqtt_backup.errors import BackupError, BrokerRefused, RestoreClientRefused, UsageError
from mqtt_backup.restore.client import Ask, NoAnswer, ask, request_for
from mqtt_backup.restore.gather import Gathered, gather, republish
from mqtt_backup.restore.request import MIN_RATE, Request
from mqtt_backup.status import Member
from mqtt_backup.topics import check_member_name

app = typer.Typer()
_T = TypeVar("_T")


class BridgeRefused(BackupError):
    """the bridge answered with an error: {detail}"""


class Incomplete(BackupError):
    """the restore is incomplete: {detail}"""


def restore_request(
    device: str,
    *,
    since_ns: int | None,
    until_ns: int | None,
    topic: str | None,
    limit: int | None,
    desc: bool,
    replay: bool,
    rate: float | None,
    retain: bool,
) -> Request:
    """The restore request from the options, checked together (one place, one line).

    Each value was checked when it was parsed; what remains is how the options fit together,
    and then the bridge's own parser (`request_for`), so that the client never sends what the
    bridge would refuse.
    """
    check_window(since_ns, until_ns)
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    if rate is not None and not replay:
        raise UsageError("--rate paces a replay", "add --replay, or leave out --rate")
    request = Request(
        device=device,
        since_ns=since_ns,
        until_ns=until_ns,
        topic=topic,
        limit=limit,
        descending=desc,
        replay=replay,
        rate=rate if replay else None,
        retain=retain and replay,
    )
    return request_for(device, request.fields())


class _Stream:
    """Writes restored messages as JSON lines (the export shape), a batch at a time; counts them.

    The client calls `flush` before it acknowledges a batch: one write per batch of messages
    (not per line), passed to the OS before the broker hears that the batch is done.
    """

    def __init__(self, out: TextIO, progress: Callable[[int], None]) -> None:
        self.out = out
        self.count = 0
        self._progress = progress
        self._lines: list[str] = []

    def __call__(self, body: dict[str, Any]) -> None:
        # Exactly the lines of `export` (output.json_line): what only the protocol needs is
        # left out, dropped from the body the client parsed for this call (no copy of it).
        for key in _PROTOCOL_ONLY:
            body.pop(key, None)
        self._lines.append(jsontext.dumps(body))
        self.count += 1

    def flush(self) -> None:
        """Write the lines taken since the last flush, in one write, and flush the output."""
        lines = self._lines
        if lines:
            lines.append("")  # the last line's newline
            self.out.write("\n".join(lines))
            lines.clear()
        self.out.flush()
        self._progress(self.count)


_PROTOCOL_ONLY = ("id", "seq", "instance")


# A `done` with "broker_drops": "unknown" is complete only as far as the bridge can see.
_DROPS_UNKNOWN = "broker drops unknown"
_DROPS_WHY = ": the broker's dropped-message counter was out of its sight"


def _drops_unknown(*terminals: dict[str, Any] | None) -> bool:
    return any(t is not None and t.get("broker_drops") == "unknown" for t in terminals)


def _summary(device: str, terminal: dict[str, Any], written: int, replay: bool = False) -> str:
    count = terminal.get("count", written)
    text = f"{'replayed' if replay else 'restored'} {output.count(count, 'message')} of {device}"
    blind = _drops_unknown(terminal)
    if terminal.get("complete", True):
        if blind:
            return f"{text} (complete as far as the bridge can see; {_DROPS_UNKNOWN}{_DROPS_WHY})"
        return text + " (complete)"
    spans = ", ".join(f"{g['since']} .. {g['until']} ({g['reason']})" for g in terminal["gaps"])
    also = f"; {_DROPS_UNKNOWN}" if blind else ""
    return text + f" (INCOMPLETE: the bridge may have missed messages in {spans}{also})"


@app.command()
def restore(
    device: Annotated[
        str, typer.Argument(click_type=DEVICE_ID, help="the device id (one topic level)")
    ],
    broker: BrokerOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    topic: TopicFilterOpt = None,
    limit: Annotated[int | None, typer.Option(help="at most this many messages")] = None,
    desc: Annotated[bool, typer.Option("--desc", help="newest first")] = False,
    replay: Annotated[
        bool, typer.Option("--replay", help="republish to the original topics instead")
    ] = False,
    rate: Annotated[
        float | None,
        typer.Option(click_type=RATE, help=f"replay: messages per second (at least {MIN_RATE})"),
    ] = None,
    retain: Annotated[
        bool, typer.Option("--retain", help="replay: keep stored retain flags")
    ] = False,
    group: Annotated[
        str | None,
        typer.Option(help="ask the bridges of this group (needed when several are online)"),
    ] = None,
    to: OutputOpt = "-",
    timeout: Annotated[
        float, typer.Option(help="give up when nothing arrives for this many seconds")
    ] = 10.0,
    namespace: NamespaceOpt = None,
    protocol: ProtocolOpt = None,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    config_file: ConfigOpt = None,
) -> None:
    """Ask the running bridge for a device's history over MQTT; JSON lines on stdout."""
    settings = load_settings(
        config_file,
        broker=broker,
        namespace=namespace,
        protocol=protocol,
        ca=ca,
        cert=cert,
        key=key,
    )
    request = restore_request(
        device,
        since_ns=since,
        until_ns=until,
        topic=topic,
        limit=limit,
        desc=desc,
        replay=replay,
        rate=rate,
        retain=retain,
    )
    if not timeout > 0:
        raise UsageError("--timeout must be > 0")
    question = Ask(
        target=settings.broker_target,
        request=request,
        namespace=settings.namespace,
        timeout=timeout,
    )
    if group is not None:
        check_member_name(group)
    if replay and _replay_gathered(question, group, rate):
        return
    with output.output_file(to) as out, output.progress() as progress:
        stream = _Stream(out, progress)
        known: list[Member] = []
        try:
            gathered = _as_client(
                gather(question, group, stream, flush=stream.flush, seen=known.extend)
            )
            if gathered is None:  # no bridge announced scale-out support: one answer, as before
                terminal = _as_client(_ask(question, stream, known))
        finally:
            stream.flush()  # what arrived is written, also when the answer was cut short
    if gathered is not None:
        _finish(device, gathered)
        return
    if "error" in terminal:
        raise BridgeRefused(terminal["error"])
    output.note(_summary(device, terminal, stream.count, replay))


async def _ask(question: Ask, stream: _Stream, known: list[Member]) -> dict[str, Any]:
    """`client.ask`; when nothing came and every bridge on the status topic is offline, say so.

    (Asked anyway: a bridge whose ACL keeps it off the status topic may still answer.)
    """
    try:
        return await ask(question, stream, stream.flush)
    except NoAnswer as exc:
        if stream.count or not known or any(m.online for m in known):
            raise
        names = ", ".join(sorted(f"{m.group}/{m.name}" for m in known))
        raise NoAnswer(
            f"{exc.detail}; the status topic shows {output.count(len(known), 'bridge')}, "
            f"all offline ({names})",
            "start the bridge ('mqtt-backup run'), or check that it reaches this broker",
        ) from None


def _as_client(work: Coroutine[Any, Any, _T]) -> _T:
    """Run the client's work; a refusal names the restore client, not the bridge."""
    try:
        return asyncio.run(work)
    except BrokerRefused as exc:
        raise RestoreClientRefused(exc.detail, exc.hint) from None


def _replay_gathered(question: Ask, group: str | None, rate: float | None) -> bool:
    """In a group, gather first, then republish in order here; False: no group answers so."""
    collected: list[dict[str, Any]] = []
    asking = dataclasses.replace(
        question, request=dataclasses.replace(question.request, replay=False, rate=None)
    )
    can_replay = functools.partial(_can_replay, question)
    gathered = _as_client(gather(asking, group, collected.append, members=can_replay))
    if gathered is None:
        return False
    if gathered.errors or gathered.silent:
        _finish(question.request.device, gathered)  # raises: nothing is replayed then
    sent = _as_client(republish(question, collected, rate))
    output.note(
        f"replayed {output.count(sent, 'message')} of {question.request.device} "
        f"from {_names(gathered)}{_completeness(gathered)}"
    )
    return True


def _can_replay(question: Ask, members: list[Member]) -> None:
    """UsageError, before anything is asked, when the group would store this replay again.

    The mark that keeps a replay from being stored again is an MQTT 5 user property: this client
    must publish it on MQTT 5, and the group's bridges must read on MQTT 5 to see it.
    """
    if not question.target.mqtt5:
        raise UsageError(
            "a replay from a group is republished by this client, which needs MQTT 5 to mark "
            "it as a replay (on 3.1.1 the bridges would store it again)",
            "use --protocol 5",
        )
    blind = [m.name for m in members if not m.mqtt5]
    if blind:
        reads, they = ("reads", "it") if len(blind) == 1 else ("read", "they")
        raise UsageError(
            f"{', '.join(blind)} of group {members[0].group} {reads} on MQTT 3.1.1, where the "
            f"replay mark cannot be seen: {they} would store the replay again",
            "restore without --replay, or run the group on MQTT 5",
        )


def _names(gathered: Gathered) -> str:
    names = gathered.answered
    return f"{output.count(len(names), 'instance')} ({', '.join(names)})"


def _completeness(gathered: Gathered) -> str:
    """` (complete)`, or which spans may miss messages (gaps any instance reported).

    Either says so when an instance could not see the broker's dropped-message counter.
    """
    spans = ", ".join(f"{g['since']} .. {g['until']} ({g['reason']})" for g in gathered.gaps)
    blind = _drops_unknown(*(s.terminal for s in gathered.streams.values()))
    if spans:
        also = f"; {_DROPS_UNKNOWN}" if blind else ""
        return f" (INCOMPLETE: may have missed messages in {spans}{also})"
    if blind:
        return f" (complete as far as the bridges can see; {_DROPS_UNKNOWN}{_DROPS_WHY})"
    return " (complete)"


def _finish(device: str, gathered: Gathered) -> None:
    """The summary line of a gathered restore; an error or a silent instance is exit 1."""
    if gathered.errors:
        said = "; ".join(f"{name}: {reason}" for name, reason in gathered.errors.items())
        raise BridgeRefused(said)
    text = (
        f"restored {output.count(gathered.written, 'message')} of {device} from {_names(gathered)}"
    )
    if gathered.silent:
        raise Incomplete(
            f"{text}, but {', '.join(gathered.silent)} sent no terminal in time (what arrived "
            "is written)",
            "look at that instance's log (mqtt-backup status shows whether it is online), "
            "or raise --timeout",
        )
    output.note(text + _completeness(gathered))
