"""The data directory's manifest: partitions (name, path, weight), format version, client id.

Written atomically (temp file, fsync, rename, fsync of the directory), so a crash leaves either the
old or the new manifest, never half of one.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mqtt_backup.errors import CorruptRecord, DataDirMissing, StorageError
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
    return Manifest(MANIFEST_FORMAT, client_id or f"mqtt-backup-{secrets.token_hex(4)}", specs)


def manifest_path(data_dir: Path) -> Path:
    """Where the manifest of a data directory lives."""
    return data_dir / MANIFEST


def load_manifest(data_dir: Path) -> Manifest:
    """Read the manifest; DataDirMissing when there is none, CorruptRecord when unreadable."""
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
    except json.JSONDecodeError as exc:
        raise CorruptRecord(f"{path} is not valid JSON: {exc}") from None
    try:
        fmt = int(raw["format"])
        parts = _specs(raw["partitions"])
        manifest = Manifest(fmt, str(raw["client_id"]), parts, _specs(raw.get("retired", [])))
    except KeyError as exc:
        raise CorruptRecord(f"{path} is malformed: missing key {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CorruptRecord(f"{path} is malformed: {exc}") from None
    if fmt != MANIFEST_FORMAT:
        raise StorageError(f"{path} has format {fmt}; this version reads {MANIFEST_FORMAT}")
    if not parts:
        raise CorruptRecord(f"{path} lists no partitions")
    return manifest


def _specs(raw: Any) -> tuple[PartitionSpec, ...]:
    return tuple(PartitionSpec(str(p["name"]), str(p["path"]), float(p["weight"])) for p in raw)


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
