"""The data directory's manifest: partitions (name, path, weight), format version, client id.

Written atomically (temp file, fsync, rename, fsync of the directory), so a crash leaves either the
old or the new manifest, never half of one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mqtt_backup.errors import BadManifest, DataDirMissing, NewerFormat, StorageError
from mqtt_backup.placement import Weighted
from mqtt_backup.storage.files import write_json_atomic

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True, slots=True)
class PartitionSpec:
    """One partition: its name, its RocksDB directory and its placement weight."""

    name: str
    path: str
    weight: float = 1.0

    def directory(self, data_dir: Path) -> Path:
        """Absolute directory; relative paths are relative to the data directory."""
        return data_dir / self.path


@dataclass(frozen=True, slots=True)
class Manifest:
    """What the data directory holds."""

    format: int
    client_id: str
    partitions: tuple[PartitionSpec, ...]
    # Partitions taken out of service whose files are still to be deleted (a crash-safe remove).
    retired: tuple[PartitionSpec, ...] = ()

    @property
    def weighted(self) -> list[Weighted]:
        """The partitions as placement sees them."""
        return [Weighted(p.name, p.weight) for p in self.partitions]

    def with_client_id(self, client_id: str) -> Manifest:
        """A copy with another client id."""
        return replace(self, client_id=client_id)


def new_manifest(partitions: int, client_id: str | None) -> Manifest:
    """A manifest for a new data directory with partitions p0..pN-1 of weight 1."""
    specs = tuple(PartitionSpec(f"p{i}", f"partitions/p{i}") for i in range(partitions))
    if client_id is None:
        import secrets  # noqa: PLC0415 - a new data dir only: hmac and OpenSSL cost every start ~10 ms

        client_id = f"mqtt-backup-{secrets.token_hex(4)}"
    return Manifest(MANIFEST_FORMAT, client_id, specs)


def manifest_path(data_dir: Path) -> Path:
    """Where the manifest of a data directory lives."""
    return data_dir / MANIFEST


def load_manifest(data_dir: Path) -> Manifest:
    """Read and check the manifest.

    DataDirMissing when there is none, NewerFormat when a newer release wrote it, BadManifest when
    it does not parse or describes a layout that would lose or misplace data.
    """
    path = manifest_path(data_dir)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataDirMissing(
            f"{data_dir} holds no mqtt-backup data ({MANIFEST} not found)",
            f"check --data, or start the bridge once: mqtt-backup run --data {data_dir}",
        ) from None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadManifest(f"{path} is not valid JSON: {exc}", _RESTORE_HINT) from None
    try:
        manifest = _parse(raw, path)
    except KeyError as exc:
        raise BadManifest(f"{path} is malformed: missing key {exc}", _RESTORE_HINT) from None
    except (TypeError, ValueError) as exc:
        raise BadManifest(f"{path} is malformed: {exc}", _RESTORE_HINT) from None
    problem = layout_problem(data_dir, manifest.partitions, manifest.retired)
    if problem:
        raise BadManifest(f"{path}: {problem}", _RESTORE_HINT)
    return manifest


_RESTORE_HINT = "fix the file by hand, or restore the data directory from a snapshot"


def _parse(raw: Any, path: Path) -> Manifest:
    """The manifest from its JSON; KeyError, TypeError or ValueError say what is wrong."""
    if not isinstance(raw, dict):
        raise TypeError("not a JSON object")
    fmt = raw["format"]
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise ValueError(f"format must be a whole number >= 1, got {fmt!r}")
    if fmt > MANIFEST_FORMAT:
        raise NewerFormat(
            f"{path} has format {fmt}; this version reads format {MANIFEST_FORMAT}",
            "upgrade mqtt-backup to the release that wrote this data directory, or newer",
        )
    parts = _specs(raw["partitions"])
    if not parts:
        raise ValueError("it lists no partitions")
    client_id = raw["client_id"]
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"client_id must be non-empty text, got {client_id!r}")
    return Manifest(fmt, client_id, parts, _specs(raw.get("retired", [])))


def _specs(raw: Any) -> tuple[PartitionSpec, ...]:
    if not isinstance(raw, list):
        raise TypeError("partitions must be a list")
    return tuple(_spec(p) for p in raw)


def _spec(raw: Any) -> PartitionSpec:
    if not isinstance(raw, dict):
        raise TypeError(f"a partition must be a JSON object, got {raw!r}")
    name, path, weight = raw["name"], raw["path"], raw["weight"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"a partition name must be non-empty text, got {name!r}")
    if not isinstance(path, str) or not path:
        raise ValueError(f"partition {name} needs a path, got {path!r}")
    # Rendezvous placement needs a positive finite weight: anything else sends devices astray.
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < math.inf:
        raise ValueError(f"partition {name} has weight {weight!r}; it must be a positive number")
    try:
        return PartitionSpec(name, path, float(weight))
    except OverflowError:  # an integer past the float range (a hand edit): no finite weight
        raise ValueError(
            f"partition {name} has weight {weight!r}; it must be a positive number within a "
            "float's range"
        ) from None


def layout_problem(
    data_dir: Path, partitions: Sequence[PartitionSpec], retired: Sequence[PartitionSpec] = ()
) -> str | None:
    """What makes this set of partitions unsafe, or None.

    Two partitions with one name would hide one of them from every read; a partition directory
    that is, holds or lies inside the data directory's root or another partition would be opened
    twice or deleted with the other one.
    """
    names = [p.name for p in partitions]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        return f"partition name {twice[0]!r} is listed twice"
    home = data_dir.resolve()
    where = [(p.name, p.directory(data_dir).resolve()) for p in (*partitions, *retired)]
    for name, path in where:
        if home.is_relative_to(path):
            return f"partition {name} at {path} is the data directory or holds it"
    for i, (name, path) in enumerate(where):
        for other, other_path in where[i + 1 :]:
            if path.is_relative_to(other_path) or other_path.is_relative_to(path):
                return f"partitions {other} and {name} overlap ({other_path} and {path})"
    return None


def _specs_json(specs: tuple[PartitionSpec, ...]) -> list[dict[str, Any]]:
    return [{"name": p.name, "path": p.path, "weight": p.weight} for p in specs]


def save_manifest(data_dir: Path, manifest: Manifest) -> None:
    """Write the manifest atomically."""
    data: dict[str, Any] = {
        "format": manifest.format,
        "client_id": manifest.client_id,
        "partitions": _specs_json(manifest.partitions),
    }
    if manifest.retired:
        data["retired"] = _specs_json(manifest.retired)
    write_json_atomic(manifest_path(data_dir), data)
