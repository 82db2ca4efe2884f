"""Commands that change data or need a consistent copy: snapshot, prune, forget, partitions.

They run where the writer is: here when the data directory is free, else inside the running
bridge over its control socket (a checkpoint or a write from a second process would not be
consistent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mqtt_backup import control, operations
from mqtt_backup.cli import output
from mqtt_backup.cli.options import ConfigOpt, DataOpt, DryRunOpt, JsonOpt, load_settings
from mqtt_backup.cli.types import DURATION, STORED_DEVICE_ID, TIME, WEIGHT
from mqtt_backup.errors import BackupError, DataDirLocked, UsageError
from mqtt_backup.storage import Store, StoreReader, moves
from mqtt_backup.storage.manifest import PartitionSpec, load_manifest
from mqtt_backup.storage.store import new_partition_error

app = typer.Typer()


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


def _show(result: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        output.print_json(result)
    else:
        output.say(text)


def _verb(dry_run: bool, did: str) -> str:
    return f"would {_PRESENT[did]}" if dry_run else did


_PRESENT = {"deleted": "delete", "moved": "move"}


# ---- snapshot, prune, forget --------------------------------------------------------------------


@app.command()
def snapshot(
    dest: Annotated[Path, typer.Argument(help="new directory for the copy")],
    data: DataOpt = None,
    as_json: JsonOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Write a consistent hot copy of every partition and the manifest to DEST."""
    settings = load_settings(config_file, data=data)
    result = writer_operation(settings.data, "snapshot", {"dest": str(dest.resolve())})
    parts = output.count(len(result["partitions"]), "partition")
    _show(result, as_json, f"snapshot of {parts} written to {dest}")


@app.command()
def prune(
    data: DataOpt = None,
    older_than: Annotated[
        int | None,
        typer.Option(click_type=DURATION, help="delete what is older than this: 30d, 12h, 90m"),
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
        "older_than_ns": older_than,
        "max_bytes_per_device": max_bytes_per_device,
        "dry_run": dry_run,
    }
    result = writer_operation(settings.data, "prune", args)
    text = (
        f"{_verb(dry_run, 'deleted')} {output.count(result['messages'], 'message')} "
        f"({output.count(result['bytes'], 'byte')}) "
        f"of {output.count(len(result['devices']), 'device')}"
    )
    _show(result, as_json, text)
    if not as_json and result["devices"]:
        _bounded_table(
            ("device", "messages", "bytes"),
            [(d["device"], d["messages"], d["bytes"]) for d in result["devices"]],
        )


@app.command()
def forget(
    # Any stored id, not only what a restore can name: a topic's empty level is a device too.
    device: Annotated[
        str, typer.Argument(click_type=STORED_DEVICE_ID, help="the device id (one topic level)")
    ],
    data: DataOpt = None,
    before: Annotated[
        int | None,
        typer.Option(click_type=TIME, help="only what was received before this time"),
    ] = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Delete one device's history (or its part before a time) with a range delete."""
    settings = load_settings(config_file, data=data)
    args = {"device": device, "before_ns": before, "dry_run": dry_run}
    result = writer_operation(settings.data, "forget", args)
    text = (
        f"{_verb(dry_run, 'deleted')} {output.count(result['messages'], 'message')} "
        f"({output.count(result['bytes'], 'byte')}) of {device}"
    )
    if result["messages"] == 0:
        # Still exit 0 (forgetting twice is no error), but a mistyped id must not look done.
        when = " before that time (if anything at all)" if before is not None else ""
        text += f": nothing of it is stored{when}; `mqtt-backup devices` lists the stored ids"
    _show(result, as_json, text)


# ---- partitions ---------------------------------------------------------------------------------

partitions = typer.Typer(
    help="List, add, remove and rebalance partitions (moves are crash-safe).",
    no_args_is_help=True,
)
app.add_typer(partitions, name="partitions")


def _moves_text(result: dict[str, Any], dry_run: bool) -> str:
    return (
        f"{_verb(dry_run, 'moved')} {output.count(result['devices'], 'device')} "
        f"({output.count(result['messages'], 'message')}, {output.count(result['bytes'], 'byte')})"
    )


# Rows of a table of devices: a big fleet moves or prunes thousands (`--json` lists them all).
DRY_RUN_ROWS = 50


def _bounded_table(columns: tuple[str, ...], rows: list[tuple[object, ...]]) -> None:
    """The first DRY_RUN_ROWS rows, and how many more there are."""
    output.table(columns, rows[:DRY_RUN_ROWS])
    if len(rows) > DRY_RUN_ROWS:
        more = output.count(len(rows) - DRY_RUN_ROWS, "more device", "more devices")
        output.say(f"... and {more} (--json lists every one)")


def _moves_table(result: dict[str, Any], as_json: bool) -> None:
    """The devices of a dry run, for people (scripts read --json)."""
    moves = result["moves"]
    if not result["dry_run"] or as_json or not moves:
        return
    _bounded_table(
        ("device", "from", "to", "messages", "bytes"),
        [(m["device"], m["from"], m["to"], m["messages"], m["bytes"]) for m in moves],
    )


_LISTED = ("name", "path", "weight", "devices", "messages", "bytes")


@partitions.command("list")
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
        output.print_json(rows)
        return
    output.table(_LISTED, ([row[k] for k in _LISTED] for row in rows))


def new_partition_path(data: Path, name: str, path: Path | None) -> tuple[str | None, Path]:
    """What to ask for as a new partition's path (None: the default), and where that is on disk.

    A relative --path is the user's: relative to the current directory, like any path typed in a
    shell. Inside the data directory it is passed on relative to it, so the directory can move.
    """
    home = data.resolve()
    if path is None:
        return None, home / "partitions" / name
    where = path.resolve()
    return (str(where.relative_to(home)) if where.is_relative_to(home) else str(where)), where


def _check_add(
    data: Path, name: str, stored: str | None, weight: float | None, shown: str
) -> PartitionSpec | None:
    """The store's checks of an add, made here first to name --path as typed.

    Returns the partition if it exists already (a re-run of its add, to finish). (The store
    knows only the path it keeps, relative to the data directory.) A missing manifest is the
    operation's to answer.
    """
    try:
        manifest = load_manifest(data)
    except BackupError:
        return None
    existing = next((p for p in manifest.partitions if p.name == name), None)
    if existing is not None:
        error = moves.readd_error(data, existing, stored, weight, shown)
    elif stored is not None:
        spec = PartitionSpec(name, stored, 1.0 if weight is None else weight)
        error = new_partition_error(data, manifest, spec, shown)
    else:
        error = None
    if error is not None:
        raise error
    return existing


@partitions.command("add")
def partitions_add(
    name: Annotated[str, typer.Argument(help="new partition name, e.g. p4")],
    path: Annotated[
        Path | None,
        typer.Option(
            help="its directory (another disk?); relative to the current directory "
            "[default: partitions/NAME in the data directory]"
        ),
    ] = None,
    weight: Annotated[
        float | None,
        typer.Option(
            click_type=WEIGHT,
            help="share of devices relative to the others [default: 1; an existing partition's "
            "own]",
            show_default=False,
        ),
    ] = None,
    dry_run: DryRunOpt = False,
    data: DataOpt = None,
    as_json: JsonOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Add a partition; only the devices it wins move (about 1/(n+1) of them)."""
    settings = load_settings(config_file, data=data)
    stored, where = new_partition_path(settings.data, name, path)
    existing = _check_add(settings.data, name, stored, weight, f"--path {path}")
    if existing is not None:
        where = existing.directory(settings.data.resolve()).resolve()
    args = {"name": name, "path": stored, "weight": weight, "dry_run": dry_run}
    result = {**writer_operation(settings.data, "partitions-add", args), "path": str(where)}
    _show(result, as_json, f"adding {name} at {where}: " + _moves_text(result, dry_run))
    _moves_table(result, as_json)


@partitions.command("remove")
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
    _show(result, as_json, f"removing {name}: " + _moves_text(result, dry_run))
    _moves_table(result, as_json)


@partitions.command("rebalance")
def partitions_rebalance(
    data: DataOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Put every device where placement says (finishes an interrupted add or remove)."""
    settings = load_settings(config_file, data=data)
    result = writer_operation(settings.data, "rebalance", {"dry_run": dry_run})
    _show(result, as_json, _moves_text(result, dry_run))
    _moves_table(result, as_json)
