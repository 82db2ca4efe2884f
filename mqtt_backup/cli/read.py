"""Read commands: devices, export, stats, verify.

They open the partitions read-only, so they work beside a running bridge.
"""

from __future__ import annotations

import csv
from enum import Enum
from typing import Annotated, Any

import typer

from mqtt_backup.cli import output
from mqtt_backup.cli.options import (
    ConfigOpt,
    DataOpt,
    JsonOpt,
    OutputOpt,
    SinceOpt,
    TopicFilterOpt,
    UntilOpt,
    check_window,
    load_settings,
)
from mqtt_backup.cli.types import STORED_DEVICE_ID
from mqtt_backup.envelope import CSV_COLUMNS, csv_row, message_envelope
from mqtt_backup.errors import StorageError
from mqtt_backup.storage import DeviceInfo, StoreReader, checks
from mqtt_backup.times import format_ts

app = typer.Typer()

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
    listed = [_device_json(d) for d in found]
    if as_json:
        output.print_json(listed)
        return
    columns = ("device", "first", "last", "count", "bytes", "duplicates", "partition")
    output.table(
        ("device", "first", "last", "count", "bytes", "dups", "partition"),
        ([row[c] for c in columns] for row in listed),
    )


# ---- export -------------------------------------------------------------------------------------


class ExportFormat(Enum):
    """Formats of `export`."""

    JSONL = "jsonl"
    CSV = "csv"


@app.command()
def export(
    data: DataOpt = None,
    device: Annotated[
        list[str] | None,
        typer.Option("--device", click_type=STORED_DEVICE_ID, help="only this device; repeatable"),
    ] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    topic: TopicFilterOpt = None,
    fmt: Annotated[ExportFormat, typer.Option("--format")] = ExportFormat.JSONL,
    to: OutputOpt = "-",
    config_file: ConfigOpt = None,
) -> None:
    """Write stored messages as JSON lines (the restore envelope) or CSV."""
    settings = load_settings(config_file, data=data)
    check_window(since, until)
    with (
        StoreReader(settings.data) as reader,
        output.output_file(to) as out,
        output.progress() as progress,
    ):
        ids = device or [d.device for d in reader.devices()]
        writer = csv.writer(out) if fmt is ExportFormat.CSV else None
        if writer is not None:
            writer.writerow(CSV_COLUMNS)
        written = 0
        for dev in ids:
            for msg in reader.messages(dev, since, until, topic):
                envelope = message_envelope(msg.device, msg.ts_ns, msg.record)
                if writer is not None:
                    writer.writerow(csv_row(envelope))
                else:
                    output.json_line(out, envelope)
                written += 1
                if written % 1000 == 0:
                    progress(written)


# ---- verify, stats ------------------------------------------------------------------------------

_SHOWN_PROBLEMS = 50


class VerifyFailed(StorageError):
    """verify found {detail}"""


@app.command()
def verify(data: DataOpt = None, as_json: JsonOpt = False, config_file: ConfigOpt = None) -> None:
    """Check every record's checksum, each device's placement and the index against the data.

    Exits 4 when it finds a problem (works beside a running bridge).
    """
    settings = load_settings(config_file, data=data)
    with output.progress("records") as progress:
        report = checks.verify(settings.data, progress)
    if as_json:
        output.print_json(report.as_json())
    else:
        output.say(
            f"{'ok' if report.ok else 'PROBLEMS'}: {output.count(report.partitions, 'partition')}, "
            f"{output.count(report.devices, 'device')}, {output.count(report.records, 'record')}, "
            f"{output.count(report.duplicates, 'redelivered copy', 'redelivered copies')}, "
            f"{output.count(report.size, 'byte')}"
        )
        for problem in report.problems[:_SHOWN_PROBLEMS]:
            output.say(f"  {problem.describe()}")
        if len(report.problems) > _SHOWN_PROBLEMS:
            rest = len(report.problems) - _SHOWN_PROBLEMS
            output.say(f"  ... and {rest} more (--json lists them all)")
    if not report.ok:
        raise VerifyFailed(
            f"{output.count(len(report.problems), 'problem')} in {settings.data}",
            "'mqtt-backup partitions rebalance' when they are misplaced devices of an "
            "interrupted move; restore damaged records from a snapshot",
        )


_STATS_COLUMNS = (
    "devices",
    "messages",
    "duplicates",
    "bytes",
    "disk_bytes",
    "oldest",
    "newest",
    "compression_ratio",
)


@app.command()
def stats(data: DataOpt = None, as_json: JsonOpt = False, config_file: ConfigOpt = None) -> None:
    """Per partition and total: messages, devices, bytes, oldest/newest, compression."""
    settings = load_settings(config_file, data=data)
    report = checks.stats(settings.data).as_json()
    if as_json:
        output.print_json(report)
        return
    named = [(p["name"], p) for p in report["partitions"]]
    output.table(
        ("partition", *_STATS_COLUMNS),
        ([name, *_stats_cells(row)] for name, row in [*named, ("total", report["total"])]),
    )
    output.say(f"gaps recorded: {report['gaps']}")


def _stats_cells(row: dict[str, Any]) -> list[object]:
    ratio = row["compression_ratio"]
    return [*(row[c] for c in _STATS_COLUMNS[:-1]), None if ratio is None else f"{ratio:.2f}"]
