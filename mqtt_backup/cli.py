"""The `mqtt-backup` command line: the only module that prints or exits.

Errors become one line on stderr and an exit code: 0 ok, 1 runtime failure, 2 usage or bad input,
3 broker unreachable or refused, 4 storage problem.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn, ParamSpec, TextIO, TypeVar

import click
import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from mqtt_backup import checks, config, control, operations
from mqtt_backup.bridge import Bridge
from mqtt_backup.envelope import CSV_COLUMNS, csv_row, message_envelope
from mqtt_backup.errors import (
    EXIT_RUNTIME,
    EXIT_STORAGE,
    EXIT_USAGE,
    BackupError,
    DataDirLocked,
    UsageError,
)
from mqtt_backup.mqtt import TlsFiles
from mqtt_backup.restore.client import Ask, ask, check_device, request_for
from mqtt_backup.simulate import FleetProgress, FleetReport, FleetSpec, run_fleet
from mqtt_backup.storage import DeviceInfo, Store, StoreReader
from mqtt_backup.times import format_ts, parse_duration, parse_time
from mqtt_backup.topics import check_filter

PROG = "mqtt-backup"
_P = ParamSpec("_P")
_R = TypeVar("_R")

app = typer.Typer(
    name=PROG,
    help="Back up every message an MQTT broker delivers; give it back over MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file [default: ./mqtt-backup.toml when present]"),
]
DataOpt = Annotated[
    Path | None, typer.Option("--data", help="data directory [default: ./mqtt-backup-data]")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="only say what would change")]
ProtocolOpt = Annotated[str | None, typer.Option(help="5 or 3.1.1 [default: 5]")]
CaOpt = Annotated[Path | None, typer.Option(help="CA certificate for mqtts://")]
CertOpt = Annotated[Path | None, typer.Option(help="client certificate (mTLS)")]
KeyOpt = Annotated[Path | None, typer.Option(help="client key (mTLS)")]
BrokerOpt = Annotated[
    str | None,
    typer.Option(
        "--broker",
        help="mqtt://[user:pass@]host[:port] or mqtts://... [default: mqtt://127.0.0.1:1883]",
    ),
]


def _fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"{PROG}: {message}\n")
    raise typer.Exit(code)


def reports_errors(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn a BackupError into its one line and exit code, also under typer's test runner."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return func(*args, **kwargs)
        except BackupError as exc:
            _fail(exc.message(), exc.exit_code)

    return wrapper


def load_settings(config_file: Path | None, **flags: Any) -> config.Settings:
    """Settings for a command: defaults < file < MQTT_BACKUP_* < flags."""
    return config.load(flags, os.environ, config_file)


# ---- run ----------------------------------------------------------------------------------------


@app.command()
@reports_errors
def run(
    broker: BrokerOpt = None,
    data: DataOpt = None,
    topic: Annotated[
        list[str] | None,
        typer.Option(
            "--topic",
            help="topic template with a {device} level; repeatable [default: devices/{device}/#]",
        ),
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option(help="MQTT client id [default: generated once, kept in the data directory]"),
    ] = None,
    partitions: Annotated[
        int | None, typer.Option(help="partitions of a new data directory [default: 4]")
    ] = None,
    namespace: Annotated[
        str | None, typer.Option(help="the bridge's own topics, never stored [default: backup]")
    ] = None,
    protocol: ProtocolOpt = None,
    transport: Annotated[
        str | None,
        typer.Option(help="asyncio or paho [default: asyncio on MQTT 5, paho on 3.1.1]"),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="serve Prometheus metrics on 127.0.0.1:PORT/metrics")
    ] = None,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    session_expiry: Annotated[
        int | None,
        typer.Option(
            help="seconds the broker keeps the session while the bridge is away [default: 604800]"
        ),
    ] = None,
    keepalive: Annotated[
        int | None, typer.Option(help="MQTT keepalive seconds [default: 30]")
    ] = None,
    batch_max: Annotated[
        int | None, typer.Option(help="messages per commit at most [default: 1000]")
    ] = None,
    batch_ms: Annotated[
        int | None, typer.Option(help="longest a batch waits for more messages [default: 20]")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error")] = None,
    response_topics: Annotated[
        str | None,
        typer.Option(
            help="strict: MQTT 5 response topics must lie under "
            "<namespace>/restore/<device>/; any: allow every topic [default: strict]"
        ),
    ] = None,
    prune_older_than: Annotated[
        str | None, typer.Option(help="retention: hourly, delete what is older (e.g. 30d)")
    ] = None,
    prune_max_bytes_per_device: Annotated[
        int | None, typer.Option(help="retention: hourly, keep each device's newest N bytes")
    ] = None,
    config_file: ConfigOpt = None,
) -> None:
    """Run the bridge: store every message of the topic templates, acknowledged after fsync."""
    settings = load_settings(
        config_file,
        broker=broker,
        data=data,
        topic=topic,
        client_id=client_id,
        partitions=partitions,
        namespace=namespace,
        protocol=protocol,
        transport=transport,
        metrics_port=metrics_port,
        ca=ca,
        cert=cert,
        key=key,
        session_expiry=session_expiry,
        keepalive=keepalive,
        batch_max=batch_max,
        batch_ms=batch_ms,
        log_level=log_level,
        response_topics=response_topics,
        prune_older_than=prune_older_than,
        prune_max_bytes_per_device=prune_max_bytes_per_device,
    )
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    bridge = Bridge(settings)
    bridge.connect()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        bridge.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bridge.run()


# ---- devices ------------------------------------------------------------------------------------


class DeviceSort(Enum):
    """Orders of the device listing (all but `device` largest or newest first)."""

    DEVICE = "device"
    COUNT = "count"
    BYTES = "bytes"
    FIRST = "first"
    LAST = "last"


def _device_json(d: DeviceInfo) -> dict[str, Any]:
    return {
        "device": d.device,
        "first": format_ts(d.first_ns),
        "last": format_ts(d.last_ns),
        "count": d.count,
        "bytes": d.size,
        "duplicates": d.dups,
        "partition": d.partition,
    }


@app.command()
@reports_errors
def devices(
    data: DataOpt = None,
    as_json: JsonOpt = False,
    sort: Annotated[DeviceSort, typer.Option(help="order of the listing")] = DeviceSort.DEVICE,
    config_file: ConfigOpt = None,
) -> None:
    """List stored devices: id, first, last, count, bytes, partition (also while running)."""
    settings = load_settings(config_file, data=data)
    with StoreReader(settings.data) as reader:
        found = reader.devices()
    field = {"first": "first_ns", "last": "last_ns", "bytes": "size"}.get(sort.value, sort.value)
    found.sort(key=lambda d: getattr(d, field), reverse=sort is not DeviceSort.DEVICE)
    if as_json:
        json.dump([_device_json(d) for d in found], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    table = Table("device", "first", "last", "count", "bytes", "dups", "partition")
    for d in found:
        row = _device_json(d)
        table.add_row(
            d.device,
            row["first"],
            row["last"],
            str(d.count),
            str(d.size),
            str(d.dups),
            d.partition,
        )
    _table_console().print(table)


def _table_console() -> Console:
    """Tables show stored data as it is: a device id like `[red]x[` is text, not markup."""
    # Piped output is for reading in full: do not truncate columns to 80 characters.
    width = None if sys.stdout.isatty() else 250
    return Console(width=width, markup=False, emoji=False, highlight=False)


# ---- export -------------------------------------------------------------------------------------


class ExportFormat(Enum):
    """Formats of `export`."""

    JSONL = "jsonl"
    CSV = "csv"


@contextmanager
def _output(path: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdout
        return
    try:
        with Path(path).open("w", encoding="utf-8", newline="") as handle:
            yield handle
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _time_opt(value: str | None, what: str) -> int | None:
    return None if value is None else parse_time(value, what)


@app.command()
@reports_errors
def export(
    data: DataOpt = None,
    device: Annotated[
        list[str] | None, typer.Option("--device", help="only this device; repeatable")
    ] = None,
    since: Annotated[str | None, typer.Option(help="from (RFC 3339 or epoch s), inclusive")] = None,
    until: Annotated[str | None, typer.Option(help="to (RFC 3339 or epoch s), exclusive")] = None,
    topic: Annotated[str | None, typer.Option("--topic", help="MQTT filter on the topic")] = None,
    fmt: Annotated[ExportFormat, typer.Option("--format")] = ExportFormat.JSONL,
    output: Annotated[str, typer.Option("--output", help="file, or - for stdout")] = "-",
    config_file: ConfigOpt = None,
) -> None:
    """Write stored messages as JSON lines (the restore envelope) or CSV."""
    settings = load_settings(config_file, data=data)
    since_ns, until_ns = _time_opt(since, "--since"), _time_opt(until, "--until")
    if since_ns is not None and until_ns is not None and since_ns > until_ns:
        raise UsageError("--since is after --until")
    if topic is not None:
        check_filter(topic)
    with StoreReader(settings.data) as reader, _output(output) as out, _progress() as progress:
        ids = device or [d.device for d in reader.devices()]
        writer = csv.writer(out) if fmt is ExportFormat.CSV else None
        if writer is not None:
            writer.writerow(CSV_COLUMNS)
        written = 0
        for dev in ids:
            for msg in reader.messages(dev, since_ns, until_ns, topic):
                envelope = message_envelope(msg.device, msg.ts_ns, msg.record)
                if writer is not None:
                    writer.writerow(csv_row(envelope))
                else:
                    out.write(json.dumps(envelope, ensure_ascii=False) + "\n")
                written += 1
                if written % 1000 == 0:
                    progress(written)


# ---- restore ------------------------------------------------------------------------------------


class _Stream:
    """Writes restored messages as JSON lines (the export shape) and keeps count."""

    def __init__(self, out: TextIO, progress: Callable[[int], None]) -> None:
        self.out = out
        self.count = 0
        self._progress = progress

    def __call__(self, body: dict[str, Any]) -> None:
        envelope = {k: v for k, v in body.items() if k not in ("id", "seq")}
        self.out.write(json.dumps(envelope, ensure_ascii=False) + "\n")
        self.count += 1
        self._progress(self.count)


def _restore_fields(
    since: str | None, until: str | None, topic: str | None, limit: int | None
) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    since_ns, until_ns = _time_opt(since, "--since"), _time_opt(until, "--until")
    if since_ns is not None and until_ns is not None and since_ns > until_ns:
        raise UsageError("--since is after --until")
    for name, ts_ns in (("since", since_ns), ("until", until_ns)):
        if ts_ns is not None:
            fields[name] = format_ts(ts_ns)
    if topic is not None:
        check_filter(topic)
        fields["topic"] = topic
    if limit is not None:
        if limit < 1:
            raise UsageError("--limit must be at least 1")
        fields["limit"] = limit
    return fields


def _summary(device: str, terminal: dict[str, Any], written: int) -> str:
    count = terminal.get("count", written)
    text = f"restored {count} messages of {device}"
    if terminal.get("complete", True):
        return text + " (complete)"
    spans = ", ".join(f"{g['since']} .. {g['until']} ({g['reason']})" for g in terminal["gaps"])
    return text + f" (INCOMPLETE: the bridge may have missed messages in {spans})"


@app.command()
@reports_errors
def restore(
    device: Annotated[str, typer.Argument(help="the device id (one topic level)")],
    broker: BrokerOpt = None,
    since: Annotated[str | None, typer.Option(help="from (RFC 3339 or epoch s), inclusive")] = None,
    until: Annotated[str | None, typer.Option(help="to (RFC 3339 or epoch s), exclusive")] = None,
    topic: Annotated[str | None, typer.Option("--topic", help="MQTT filter on the topic")] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many messages")] = None,
    desc: Annotated[bool, typer.Option("--desc", help="newest first")] = False,
    replay: Annotated[
        bool, typer.Option("--replay", help="republish to the original topics instead")
    ] = False,
    rate: Annotated[float | None, typer.Option(help="replay: messages per second")] = None,
    retain: Annotated[
        bool, typer.Option("--retain", help="replay: keep stored retain flags")
    ] = False,
    output: Annotated[str, typer.Option("--output", help="file, or - for stdout")] = "-",
    timeout: Annotated[
        float, typer.Option(help="give up when nothing arrives for this many seconds")
    ] = 10.0,
    namespace: Annotated[str | None, typer.Option(help="[default: backup]")] = None,
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
    check_device(device)
    fields = _restore_fields(since, until, topic, limit)
    if desc:
        fields["order"] = "desc"
    if replay:
        fields["mode"] = "replay"
        fields["retain"] = retain
        if rate is not None:
            if not 0 < rate < math.inf:  # also refuses nan, which JSON cannot carry
                raise UsageError(f"--rate must be a finite number > 0, not {rate:g}")
            fields["rate"] = rate
    if not timeout > 0:
        raise UsageError("--timeout must be > 0")
    question = Ask(
        address=settings.broker_address,
        request=request_for(device, fields),
        namespace=settings.namespace,
        protocol=settings.protocol,
        tls_files=TlsFiles(
            *(str(p) if p else None for p in (settings.ca, settings.cert, settings.key))
        ),
        timeout=timeout,
    )
    with _output(output) as out, _progress() as progress:
        stream = _Stream(out, progress)
        terminal = asyncio.run(ask(question, stream))
    if "error" in terminal:
        _fail(f"the bridge answered with an error: {terminal['error']}", EXIT_RUNTIME)
    sys.stderr.write(_summary(device, terminal, stream.count) + "\n")


@contextmanager
def _progress(unit: str = "messages") -> Iterator[Callable[[int], None]]:
    """A live count on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield lambda _count: None
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.completed} " + unit),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("restore", total=None)
        yield lambda count: bar.update(task, completed=count)


# ---- verify, stats -------------------------------------------------------------------------------

_SHOWN_PROBLEMS = 50


@app.command()
@reports_errors
def verify(data: DataOpt = None, as_json: JsonOpt = False, config_file: ConfigOpt = None) -> None:
    """Check every record's checksum, each device's placement and the index against the data.

    Exits 4 when it finds a problem (works beside a running bridge).
    """
    settings = load_settings(config_file, data=data)
    with _progress("records") as progress:
        report = checks.verify(settings.data, progress)
    if as_json:
        json.dump(report.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(
            f"{'ok' if report.ok else 'PROBLEMS'}: {report.partitions} partitions, "
            f"{report.devices} devices, {report.records} records, {report.duplicates} "
            f"redelivered copies, {report.size} bytes\n"
        )
        for problem in report.problems[:_SHOWN_PROBLEMS]:
            sys.stdout.write(f"  {problem.describe()}\n")
        if len(report.problems) > _SHOWN_PROBLEMS:
            rest = len(report.problems) - _SHOWN_PROBLEMS
            sys.stdout.write(f"  ... and {rest} more (--json lists them all)\n")
    if not report.ok:
        _fail(
            f"verify found {len(report.problems)} problems in {settings.data}. Try: "
            "'mqtt-backup partitions rebalance' when they are misplaced devices of an "
            "interrupted move; restore damaged records from a snapshot",
            EXIT_STORAGE,
        )


@app.command()
@reports_errors
def stats(data: DataOpt = None, as_json: JsonOpt = False, config_file: ConfigOpt = None) -> None:
    """Per partition and total: messages, devices, bytes, oldest/newest, compression."""
    settings = load_settings(config_file, data=data)
    report = checks.stats(settings.data)
    if as_json:
        json.dump(report.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    columns = (
        "devices",
        "messages",
        "duplicates",
        "bytes",
        "disk_bytes",
        "oldest",
        "newest",
        "compression_ratio",
    )
    table = Table("partition", *columns)
    rows = [(p["name"], p) for p in report.as_json()["partitions"]]
    rows.append(("total", report.as_json()["total"]))
    for name, row in rows:
        ratio = row["compression_ratio"]
        cells = [str(row[c]) if row[c] is not None else "-" for c in columns[:-1]]
        table.add_row(name, *cells, f"{ratio:.2f}" if ratio is not None else "-")
    _table_console().print(table)
    sys.stdout.write(f"gaps recorded: {report.gaps}\n")


# ---- snapshot, prune, forget: run by the writer --------------------------------------------------


def writer_operation(data: Path, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run an operation where the writer is: here when the directory is free, else in the bridge.

    A checkpoint or write from another process than the writer would not be consistent, so a
    running bridge does the work (over its control socket) between two commits.
    """
    try:
        store = Store.open(data, create=False, to_free_space=operations.frees_space(op, args))
    except DataDirLocked:
        return control.call(data, op, args)
    try:
        return operations.run(store, op, args)
    finally:
        store.close()


def _print_result(result: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text + "\n")


def _removal_table(result: dict[str, Any]) -> None:
    if not result["devices"]:
        return
    table = Table("device", "messages", "bytes")
    for d in result["devices"]:
        table.add_row(d["device"], str(d["messages"]), str(d["bytes"]))
    _table_console().print(table)


@app.command()
@reports_errors
def snapshot(
    dest: Annotated[Path, typer.Argument(help="new directory for the copy")],
    data: DataOpt = None,
    as_json: JsonOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Write a consistent hot copy of every partition and the manifest to DEST."""
    settings = load_settings(config_file, data=data)
    result = writer_operation(settings.data, "snapshot", {"dest": str(dest.resolve())})
    parts = len(result["partitions"])
    _print_result(result, as_json, f"snapshot of {parts} partitions written to {dest}")


@app.command()
@reports_errors
def prune(
    data: DataOpt = None,
    older_than: Annotated[
        str | None, typer.Option(help="delete what is older than this: 30d, 12h, 90m")
    ] = None,
    max_bytes_per_device: Annotated[
        int | None, typer.Option(help="keep each device's newest N stored bytes")
    ] = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Delete old messages per device (one range delete each), now or as a dry run."""
    settings = load_settings(config_file, data=data)
    if older_than is None and max_bytes_per_device is None:
        raise UsageError("say what to prune", "--older-than 30d or --max-bytes-per-device N")
    if max_bytes_per_device is not None and max_bytes_per_device < 1:
        raise UsageError("--max-bytes-per-device must be at least 1")
    args = {
        "older_than_ns": parse_duration(older_than, "--older-than") if older_than else None,
        "max_bytes_per_device": max_bytes_per_device,
        "dry_run": dry_run,
    }
    result = writer_operation(settings.data, "prune", args)
    verb = "would delete" if dry_run else "deleted"
    text = (
        f"{verb} {result['messages']} messages ({result['bytes']} bytes) "
        f"of {len(result['devices'])} devices"
    )
    _print_result(result, as_json, text)
    if not as_json:
        _removal_table(result)


@app.command()
@reports_errors
def forget(
    device: Annotated[str, typer.Argument(help="the device id")],
    data: DataOpt = None,
    before: Annotated[
        str | None, typer.Option(help="only what was received before this time")
    ] = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Delete one device's history (or its part before a time) with a range delete."""
    settings = load_settings(config_file, data=data)
    args = {"device": device, "before_ns": _time_opt(before, "--before"), "dry_run": dry_run}
    result = writer_operation(settings.data, "forget", args)
    verb = "would delete" if dry_run else "deleted"
    text = f"{verb} {result['messages']} messages ({result['bytes']} bytes) of {device}"
    _print_result(result, as_json, text)


# ---- partitions -------------------------------------------------------------------------------

partitions_app = typer.Typer(
    help="List, add, remove and rebalance partitions (moves are crash-safe).",
    no_args_is_help=True,
)
app.add_typer(partitions_app, name="partitions")


def _moves_text(result: dict[str, Any], verb: str) -> str:
    return (
        f"{verb} {result['devices']} devices ({result['messages']} messages, "
        f"{result['bytes']} bytes)"
    )


@partitions_app.command("list")
@reports_errors
def partitions_list(
    data: DataOpt = None, as_json: JsonOpt = False, config_file: ConfigOpt = None
) -> None:
    """Partitions with their path, weight, devices, messages and stored bytes."""
    settings = load_settings(config_file, data=data)
    with StoreReader(settings.data) as reader:
        found = reader.devices()
        rows = [
            {
                "name": spec.name,
                "path": str(spec.directory(settings.data)),
                "weight": spec.weight,
                "devices": sum(1 for d in found if d.partition == spec.name),
                "messages": sum(d.count for d in found if d.partition == spec.name),
                "bytes": sum(d.size for d in found if d.partition == spec.name),
            }
            for spec in reader.manifest.partitions
        ]
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    table = Table("name", "path", "weight", "devices", "messages", "bytes")
    for row in rows:
        table.add_row(
            *(str(row[k]) for k in ("name", "path", "weight", "devices", "messages", "bytes"))
        )
    _table_console().print(table)


@partitions_app.command("add")
@reports_errors
def partitions_add(
    name: Annotated[str, typer.Argument(help="new partition name, e.g. p4")],
    path: Annotated[
        str | None, typer.Option(help="its directory (another disk?) [default: partitions/NAME]")
    ] = None,
    weight: Annotated[float, typer.Option(help="share of devices relative to the others")] = 1.0,
    dry_run: DryRunOpt = False,
    data: DataOpt = None,
    as_json: JsonOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Add a partition; only the devices it wins move (about 1/(n+1) of them)."""
    settings = load_settings(config_file, data=data)
    args = {"name": name, "path": path, "weight": weight, "dry_run": dry_run}
    result = writer_operation(settings.data, "partitions-add", args)
    verb = "would move" if dry_run else "moved"
    _print_result(result, as_json, f"adding {name}: " + _moves_text(result, verb))
    _moves_table(result, as_json)


@partitions_app.command("remove")
@reports_errors
def partitions_remove(
    name: Annotated[str, typer.Argument(help="the partition to remove")],
    dry_run: DryRunOpt = False,
    data: DataOpt = None,
    as_json: JsonOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Remove a partition; only its devices move, each to its next-best partition."""
    settings = load_settings(config_file, data=data)
    args = {"name": name, "dry_run": dry_run}
    result = writer_operation(settings.data, "partitions-remove", args)
    verb = "would move" if dry_run else "moved"
    _print_result(result, as_json, f"removing {name}: " + _moves_text(result, verb))
    _moves_table(result, as_json)


@partitions_app.command("rebalance")
@reports_errors
def partitions_rebalance(
    data: DataOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Put every device where placement says (finishes an interrupted add or remove)."""
    settings = load_settings(config_file, data=data)
    result = writer_operation(settings.data, "rebalance", {"dry_run": dry_run})
    _print_result(result, as_json, _moves_text(result, "would move" if dry_run else "moved"))
    _moves_table(result, as_json)


def _moves_table(result: dict[str, Any], as_json: bool) -> None:
    """The devices of a dry run, for people (scripts read --json)."""
    if not result["dry_run"] or as_json or not result["moves"]:
        return
    table = Table("device", "from", "to", "messages", "bytes")
    for m in result["moves"]:
        table.add_row(m["device"], m["from"], m["to"], str(m["messages"]), str(m["bytes"]))
    _table_console().print(table)


# ---- simulate -------------------------------------------------------------------------------


@app.command()
@reports_errors
def simulate(
    broker: BrokerOpt = None,
    devices: Annotated[int, typer.Option(help="devices in the fleet")] = 10,
    rate: Annotated[float, typer.Option(help="messages per second, the whole fleet")] = 10.0,
    duration: Annotated[float, typer.Option(help="seconds to run; 0 runs until Ctrl-C")] = 60.0,
    prefix: Annotated[
        str, typer.Option(help="device ids are PREFIX-0000, PREFIX-0001, ...")
    ] = "sim",
    qos: Annotated[int, typer.Option(help="0 or 1")] = 1,
    protocol: ProtocolOpt = None,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    config_file: ConfigOpt = None,
) -> None:
    """Publish realistic telemetry from a fleet of devices (JSON, binary, several topic shapes)."""
    settings = load_settings(
        config_file, broker=broker, protocol=protocol, ca=ca, cert=cert, key=key
    )
    spec = FleetSpec(
        address=settings.broker_address,
        devices=devices,
        rate=rate,
        duration=duration,
        prefix=prefix,
        qos=qos,
        protocol=settings.protocol,
        tls_files=TlsFiles(
            *(str(p) if p else None for p in (settings.ca, settings.cert, settings.key))
        ),
    )
    templates = " ".join(f"--topic '{t}'" for t in spec.topics_for_bridge)
    sys.stderr.write(
        f"simulating {devices} devices at {rate:g} msg/s on {settings.broker_address}; "
        f"the bridge stores every shape with: mqtt-backup run {templates}\n"
    )
    report = asyncio.run(_fleet_until_interrupted(spec))
    sys.stderr.write(
        f"published {report.published} messages (+{report.retained} retained statuses) from "
        f"{report.devices} devices in {report.elapsed:.1f} s ({report.rate:.0f} msg/s)\n"
    )


async def _fleet_until_interrupted(spec: FleetSpec) -> FleetReport:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def show(progress: FleetProgress) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{progress.published} published, {progress.rate:.0f} msg/s ")

    return await run_fleet(spec, stop, show)


# ---- entry point --------------------------------------------------------------------------------


def _command_path(exc: click.UsageError, argv: list[str]) -> str:
    # A missing option value is reported with the group's context: name the subcommand anyway.
    if exc.ctx is not None and exc.ctx.command_path != PROG:
        return exc.ctx.command_path
    command = next((a for a in argv if not a.startswith("-")), None)
    return f"{PROG} {command}" if command in app_commands() else PROG


def app_commands() -> set[str]:
    """Names of the subcommands."""
    group = typer.main.get_command(app)
    return set(group.commands) if isinstance(group, click.Group) else set()


def main(argv: list[str] | None = None) -> NoReturn:
    """Console script: run the app, turning every error into one line and an exit code."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        sys.stderr.write(exc.format_message() + "\n")
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:
        where = _command_path(exc, argv if argv is not None else sys.argv[1:])
        sys.stderr.write(f"{PROG}: {exc.format_message().rstrip('.')}. Try: {where} --help\n")
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        sys.stderr.write(f"{PROG}: {exc.format_message()}\n")
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
    except BackupError as exc:
        sys.stderr.write(f"{PROG}: {exc.message()}\n")
        sys.exit(exc.exit_code)
    except Exception as exc:
        # A bug, not a user's mistake: still one line; the traceback when asked for.
        if os.environ.get("MQTT_BACKUP_DEBUG"):
            raise
        sys.stderr.write(
            f"{PROG}: internal error: {type(exc).__name__}: {exc}. Try: MQTT_BACKUP_DEBUG=1 "
            "for the traceback, and report it\n"
        )
        sys.exit(EXIT_RUNTIME)
    sys.exit(code if isinstance(code, int) else 0)
