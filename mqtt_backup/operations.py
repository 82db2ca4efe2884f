"""The control-socket dispatcher: an operation's name and JSON arguments -> storage -> JSON.

snapshot, prune, forget and the partition moves run where the writer is: offline the CLI opens
the store itself; with a bridge running, the CLI sends them over the control socket and the
bridge runs them in units (`storage.units`) with its commits between them (a snapshot is one
unit, so it is consistent across partitions). The work is `storage.maintenance` and
`storage.moves`; their typed results cross the socket as `as_json()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mqtt_backup.errors import UsageError
from mqtt_backup.storage import Store, maintenance, moves
from mqtt_backup.storage.units import Units, to_the_end

_T = TypeVar("_T")


class Result(Protocol):
    """What every maintenance result offers: the JSON document scripts read."""

    def as_json(self) -> dict[str, Any]:
        """The result as `--json` prints it."""
        ...


def frees_space(op: str, args: Mapping[str, Any]) -> bool:
    """Whether the operation deletes: prune or forget, without --dry-run.

    Only those may spend the ballast on a full disk; a dry run or a snapshot would use up the
    reserve and free nothing.
    """
    return op in ("prune", "forget") and not args.get("dry_run")


def run(store: Store, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Run an operation by name (what the control socket receives); UsageError for bad ones.

    Afterwards compactions are on again and the ballast is made again if the operation gave the
    disk room for it.
    """
    return to_the_end(units(store, op, args))


def units(store: Store, op: str, args: Mapping[str, Any]) -> Units[dict[str, Any]]:
    """`run` in units, for a caller that commits between them (the asyncio bridge)."""
    result: Result | None = None
    try:
        result = yield from _dispatch(store, op, args)
        return result.as_json()
    finally:
        store.done_freeing(deleted=_deleted(result))


def _deleted(result: Result | None) -> bool:
    """Whether the operation removed messages (a failed one may have: counted as deleting)."""
    match result:
        case None:
            return True
        case maintenance.Pruned():
            return not result.dry_run and result.messages > 0
        case maintenance.Forgotten():
            return not result.dry_run and result.removed.messages > 0
        case _:
            return False


def _dispatch(store: Store, op: str, args: Mapping[str, Any]) -> Units[Result]:
    dry_run = bool(args.get("dry_run", False))
    match op:
        case "snapshot":  # one unit: consistent across partitions
            return maintenance.snapshot(store, Path(_arg(args, "dest", str)))
        case "prune":
            return (
                yield from maintenance.pruning(
                    store,
                    _opt(args, "older_than_ns", int),
                    _opt(args, "max_bytes_per_device", int),
                    dry_run,
                )
            )
        case "forget":
            return (
                yield from maintenance.forgetting(
                    store, _arg(args, "device", str), _opt(args, "before_ns", int), dry_run
                )
            )
        case "partitions-add":
            return (
                yield from moves.adding(
                    store,
                    _arg(args, "name", str),
                    _opt(args, "path", str),
                    _weight(args),
                    dry_run,
                )
            )
        case "partitions-remove":
            return (yield from moves.removing(store, _arg(args, "name", str), dry_run))
        case "rebalance":
            return (yield from moves.rebalancing(store, dry_run))
        case _:
            raise UsageError(f"unknown operation {op!r}")


def _arg(args: Mapping[str, Any], name: str, kind: type[_T]) -> _T:
    value = args.get(name)
    if not isinstance(value, kind):
        raise UsageError(f"operation argument {name!r} must be {kind.__name__}")
    return value


def _weight(args: Mapping[str, Any]) -> float | None:
    # JSON carries 2.0 as 2 from some writers: any number will do.
    weight = args.get("weight")
    if weight is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise UsageError("operation argument 'weight' must be a number")
    return float(weight)


def _opt(args: Mapping[str, Any], name: str, kind: type[_T]) -> _T | None:
    return None if args.get(name) is None else _arg(args, name, kind)
