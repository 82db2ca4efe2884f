"""The data directory is safe to open: old stores keep working, foreign or damaged ones are refused.

A store written by an earlier release is kept in tests/fixtures (see its README); every version
must open it, read-only and as a writer, and read every message back unchanged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rocksdict import Rdict
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.config import ENV_PREFIX
from mqtt_backup.errors import EXIT_STORAGE, EXIT_USAGE, BadManifest, ForeignDataDir
from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store, StoreReader
from mqtt_backup.storage import store as store_module
from mqtt_backup.storage.journal import BridgeState
from mqtt_backup.storage.manifest import MANIFEST, load_manifest, manifest_path
from tools.devbroker import free_port

REPO = Path(__file__).resolve().parent.parent
BASE_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
FIXTURES = Path(__file__).resolve().parent / "fixtures"
STORE_V1 = FIXTURES / "store-v1"
EXPORT_V1 = FIXTURES / "store-v1.export.jsonl"


@pytest.fixture
def store_v1(tmp_path: Path) -> Path:
    """A private copy of the store written by release 1 (opening writes to RocksDB's files)."""
    data = tmp_path / "store-v1"
    shutil.copytree(STORE_V1, data)
    return data


def exported(data: Path) -> list[str]:
    """`mqtt-backup export` of a data directory, as lines."""
    result = CliRunner().invoke(app, ["export", "--data", str(data)])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def expected_v1() -> list[str]:
    """What release 1 exported from the fixture."""
    return EXPORT_V1.read_text(encoding="utf-8").splitlines()


# ---- a store written by release 1 ---------------------------------------------------------------


def test_release_1_store_reads_every_message(store_v1: Path) -> None:
    assert len(expected_v1()) == 40
    assert exported(store_v1) == expected_v1()
    with StoreReader(store_v1) as reader:
        devices = {d.device: d.count for d in reader.devices()}
        assert sum(devices.values()) == 40
        assert devices["sensor-0"] == 9  # 5 in table files, 4 only in the WAL
        assert devices["wal-only"] == 1
        props = next(reader.messages("props-dev")).record
        assert props.properties is not None
        assert props.properties.user == (("k", "v"), ("k", "w"))
        assert next(reader.messages("bin-dev")).record.payload == bytes(range(256))
        assert [g.reason for g in reader.gaps.all()] == ["session-lost"]
    assert BridgeState.load(store_v1).subscriptions == ["devices/+/#"]


def test_release_1_store_opens_as_a_writer(store_v1: Path) -> None:
    store = Store.open(store_v1, create=False)
    try:
        assert store.client_id == "mqtt-backup-fixture-v1"
        assert [s.name for s in store.manifest.partitions] == ["p0", "p1", "p2"]
        partition, dev_key = store.locate("sensor-0")
        last = max(m["ts"] for m in map(json.loads, expected_v1()))
        new = Pending("sensor-0", dev_key, 0, Record("devices/sensor-0/t", b"new"))
        store.write(partition, [new])
    finally:
        store.close()
    lines = exported(store_v1)
    assert set(expected_v1()) <= set(lines)
    added = [json.loads(x) for x in lines if x not in expected_v1()]
    assert [(a["device"], a["payload"]) for a in added] == [("sensor-0", "new")]
    # The partition's hybrid clock survived: the new message sorts after everything before it.
    assert added[0]["ts"] > last


# ---- a directory that is not ours ---------------------------------------------------------------


def cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`python -m mqtt_backup ARGS` in a clean environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "mqtt_backup", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert exit `code` and one `mqtt-backup:` line on stderr; return the line."""
    shown = f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.returncode == code, shown
    assert "Traceback" not in result.stderr, shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1, shown
    assert lines[0].startswith("mqtt-backup: "), shown
    return lines[0]


def contents(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) below `root`."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def foreign_db(tmp_path: Path) -> Path:
    """Another application's RocksDB directory (it has a LOCK file too)."""
    path = tmp_path / "other-app-db"
    db = Rdict(str(path))
    db[b"key"] = b"their data"
    db.close()
    (path / "LOCK").write_text("their lock")
    return path


@pytest.fixture
def closed_url() -> str:
    """A broker URL on a port nothing listens on."""
    return f"mqtt://127.0.0.1:{free_port()}"


def test_another_programs_database_is_refused_and_left_alone(
    foreign_db: Path, closed_url: str, tmp_path: Path
) -> None:
    before = contents(foreign_db)
    result = cli("run", "--broker", closed_url, "--data", str(foreign_db), cwd=tmp_path)
    line = one_line_error(result, EXIT_STORAGE)
    assert "not an mqtt-backup data directory" in line
    assert "CURRENT" in line
    assert "Try:" in line
    assert contents(foreign_db) == before, "nothing of theirs may change, LOCK least of all"
    for command in (["devices"], ["export"], ["prune", "--older-than", "1d"], ["snapshot", "x"]):
        one_line_error(cli(*command, "--data", str(foreign_db), cwd=tmp_path), EXIT_STORAGE)
    assert contents(foreign_db) == before


def test_a_directory_of_other_files_is_refused(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ForeignDataDir) as caught:
        Store.open(mine, 2)
    assert caught.value.exit_code == EXIT_STORAGE
    assert "notes.txt" in caught.value.message()
    assert contents(mine) == {"notes.txt": b"mine"}


def test_an_empty_volume_is_taken_and_a_failed_start_gives_it_back(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    (volume / "lost+found").mkdir(parents=True)
    store = Store.open(volume, 2)
    assert (volume / MANIFEST).is_file()
    store.discard_new()  # what a start that fails afterwards (broker unreachable) does
    assert contents(volume) == {"lost+found": None}


def test_a_layout_cut_short_before_its_manifest_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()

    def crash(*_args: object) -> None:
        raise KeyboardInterrupt("injected crash before the manifest")

    monkeypatch.setattr(store_module, "save_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        Store.open(data, 2)
    monkeypatch.undo()
    assert MANIFEST not in {p.name for p in data.iterdir()}
    assert (data / "partitions" / "p0" / "CURRENT").is_file()
    Store.open(data, 2).close()
    assert len(load_manifest(data).partitions) == 2


# ---- a damaged manifest -------------------------------------------------------------------------


def edit_manifest(data: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Apply `change` to the manifest's JSON in place (NaN written as JSON's NaN literal)."""
    raw = json.loads(manifest_path(data).read_text(encoding="utf-8"))
    change(raw)
    manifest_path(data).write_text(json.dumps(raw), encoding="utf-8")


def weight(value: object) -> Callable[[dict[str, Any]], object]:
    """Give partition p1 this weight."""
    return lambda raw: raw["partitions"][1].update(weight=value)


def path_of_p1(value: str) -> Callable[[dict[str, Any]], object]:
    """Give partition p1 this path."""
    return lambda raw: raw["partitions"][1].update(path=value)


BAD_MANIFESTS: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "negative weight": (weight(-1.0), "weight -1.0"),
    "NaN weight": (weight(math.nan), "weight nan"),
    "infinite weight": (weight(math.inf), "weight inf"),
    "zero weight": (weight(0), "weight 0"),
    "weight as text": (weight("1"), "weight '1'"),
    "duplicate name": (lambda raw: raw["partitions"][1].update(name="p0"), "'p0' is listed twice"),
    "shared path": (path_of_p1("partitions/p0"), "overlap"),
    "nested path": (path_of_p1("partitions/p0/inner"), "overlap"),
    "data dir as partition": (path_of_p1("."), "is the data directory or holds it"),
    "parent as partition": (path_of_p1(".."), "is the data directory or holds it"),
    "empty path": (path_of_p1(""), "needs a path"),
    "retired over a live one": (
        lambda raw: raw.update(retired=[{"name": "old", "path": "partitions/p2", "weight": 1}]),
        "overlap",
    ),
    "format as text": (lambda raw: raw.update(format="1"), "format must be"),
    "format 0": (lambda raw: raw.update(format=0), "format must be"),
    "client id not text": (lambda raw: raw.update(client_id=7), "client_id"),
    "partitions not a list": (lambda raw: raw.update(partitions={"p0": 1}), "must be a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_damaged_manifest_is_refused(tmp_path: Path, case: str) -> None:
    data = tmp_path / "data"
    Store.open(data, 3).close()
    change, expect = BAD_MANIFESTS[case]
    edit_manifest(data, change)
    before = contents(data)
    for opener in (Store.open, StoreReader):
        with pytest.raises(BadManifest) as caught:
            opener(data)
        message = caught.value.message()
        assert caught.value.exit_code == EXIT_STORAGE
        assert expect in message
        assert MANIFEST in message
        assert "\n" not in message
    assert contents(data) == before


@pytest.mark.parametrize("case", ["negative weight", "duplicate name", "NaN weight"])
def test_read_commands_refuse_a_damaged_manifest(tmp_path: Path, case: str) -> None:
    data = tmp_path / "data"
    fill(data, {f"dev-{n}": [f"m{i}" for i in range(3)] for n in range(12)})
    edit_manifest(data, BAD_MANIFESTS[case][0])
    for command in ("devices", "export", "verify", "stats"):
        line = one_line_error(cli(command, "--data", str(data), cwd=tmp_path), EXIT_STORAGE)
        assert "damaged manifest" in line, command


def test_a_newer_format_is_refused(tmp_path: Path, closed_url: str) -> None:
    data = tmp_path / "data"
    fill(data, {"dev-1": ["m0"]})
    edit_manifest(data, lambda raw: raw.update(format=2, shape="unknown to this release"))
    before = contents(data)
    for command in (["devices"], ["export"], ["run", "--broker", closed_url], ["forget", "x"]):
        line = one_line_error(cli(*command, "--data", str(data), cwd=tmp_path), EXIT_STORAGE)
        assert "written by a newer mqtt-backup" in line
        assert "format 2; this version reads format 1" in line
    # Only our own lock file took the pid of the last process that tried.
    assert {k: v for k, v in contents(data).items() if k != "LOCK"} == {
        k: v for k, v in before.items() if k != "LOCK"
    }


# ---- partitions add --path ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "expect"),
    [
        (".restore-reader/p9", "data directory's own files"),
        ("partitions/deeper/p9", "data directory's own files"),
        ("p9", "data directory's own files"),
        ("partitions", "data directory's own files"),
        (".", "data directory's own files"),
        ("..", "is the data directory or holds it"),
        ("partitions/p0", "overlap"),
        ("partitions/p1/p9", "data directory's own files"),
        (str(Path("partitions") / ".." / "partitions" / "p0"), "overlap"),
        ("{elsewhere}", "overlap"),  # another partition lies below it
    ],
)
def test_partitions_add_refuses_a_path_on_the_stores_own_files(
    tmp_path: Path, where: str, expect: str
) -> None:
    data = tmp_path / "data"
    fill(data, {"dev-1": ["m0"]})
    elsewhere = tmp_path / "disk2"
    _add(data, "p3", str(elsewhere / "p3"), tmp_path)
    path = where.format(elsewhere=elsewhere)
    # Opening the writer rolls RocksDB's own files; what must not change is the layout.
    before = (manifest_path(data).read_text(), folders(data), folders(elsewhere))
    line = one_line_error(
        cli("partitions", "add", "p9", "--path", path, "--data", str(data), cwd=tmp_path),
        EXIT_USAGE,
    )
    assert expect in line
    assert f"--path {path}" in line
    assert (manifest_path(data).read_text(), folders(data), folders(elsewhere)) == before


def folders(root: Path) -> list[Path]:
    """Every directory below `root`."""
    return sorted(p for p in root.rglob("*") if p.is_dir())


def _add(data: Path, name: str, path: str, cwd: Path) -> None:
    result = cli("partitions", "add", name, "--path", path, "--data", str(data), cwd=cwd)
    assert result.returncode == 0, result.stderr


def test_partitions_add_takes_a_path_on_another_disk(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fleet = {f"dev-{n}": [f"m{i}" for i in range(2)] for n in range(20)}
    fill(data, fleet)
    _add(data, "p3", str(tmp_path / "disk2" / "p3"), tmp_path)
    _add(data, "p4", "partitions/p4", tmp_path)
    assert (tmp_path / "disk2" / "p3" / "CURRENT").is_file()
    with StoreReader(data) as reader:
        got = {d: [m.record.payload.decode() for m in reader.messages(d)] for d in fleet}
        assert {d.partition for d in reader.devices()} >= {"p3"}
    assert got == fleet


def fill(data: Path, fleet: dict[str, list[str]]) -> None:
    """A new 3-partition store holding {device: [payload text...]}."""
    store = Store.open(data, 3)
    try:
        for n, (device, payloads) in enumerate(fleet.items()):
            partition, dev_key = store.locate(device)
            items = [
                Pending(device, dev_key, BASE_NS + n * 1000 + i, Record(f"d/{device}", p.encode()))
                for i, p in enumerate(payloads)
            ]
            store.write(partition, items)
    finally:
        store.close()
