"""The data directory is safe to open: old stores keep working, foreign or damaged ones are refused.

A store written by an earlier release is kept in tests/fixtures (see its README); every version
must open it, read-only and as a writer, and read every message back unchanged.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rocksdict import Rdict
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.config import Settings
from mqtt_backup.errors import (
    EXIT_STORAGE,
    EXIT_USAGE,
    BadManifest,
    DataDirLocked,
    ForeignDataDir,
)
from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store, StoreReader, moves
from mqtt_backup.storage import store as store_module
from mqtt_backup.storage.files import DirLock
from mqtt_backup.storage.journal import BridgeState, Gap
from mqtt_backup.storage.manifest import MANIFEST, load_manifest, manifest_path
from tests.conftest import (
    BridgeThread,
    Broker,
    Sent,
    make_settings,
    publish,
    stored_count,
    wait_until,
)
from tests.test_cli_errors import cli, one_line_error
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


# `cli` and `one_line_error` (test_cli_errors) run the command lines in this process, through
# the console script's own error mapping (Root.main): the one stderr line and the exit code a
# shell sees, without a Python start each (test_cli_subprocess runs the real processes).


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


def test_a_partitions_folder_of_another_kind_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "partitions" / "2024-q1").mkdir(parents=True)
    with pytest.raises(ForeignDataDir):
        Store.open(data, 2)
    assert contents(data) == {"partitions": None, "partitions/2024-q1": None}


def test_an_empty_volume_is_taken_and_a_failed_start_gives_it_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    volume = tmp_path / "volume"
    (volume / "lost+found").mkdir(parents=True)
    volume.chmod(0o755)
    with caplog.at_level(logging.INFO):
        store = Store.open(volume, 2)
    assert (volume / MANIFEST).is_file()
    assert stat.S_IMODE(volume.stat().st_mode) == 0o700
    assert caplog.records == [], "a new layout is private from the start: nothing to report"
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
    "weight past the float range": (weight(10**400), "weight 1000000"),
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
    # Run from the data directory: a relative --path is relative to the current directory.
    line = one_line_error(
        cli("partitions", "add", "p9", "--path", path, "--data", str(data), cwd=data),
        EXIT_USAGE,
    )
    assert expect in line
    assert f"--path {Path(path)}" in line, "named as typed"
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
    _add(data, "p4", "partitions/p4", data)  # relative to the current directory
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


# ---- private to its owner -----------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual login umask: new files would be 0644, directories 0755."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def open_to_others(root: Path) -> list[str]:
    """Entries below `root` (itself included) that group or others may read, with their mode."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            found.append(f"{oct(mode)} {path.relative_to(root.parent)}")
    return found


@pytest.mark.usefixtures("umask_022")
def test_a_running_bridge_keeps_everything_private(
    broker: Broker, tmp_path: Path, run_bridge: Callable[[Settings], BridgeThread], unique: str
) -> None:
    data = tmp_path / "data"
    bridge = run_bridge(make_settings(broker, data))
    wait_until(bridge.bridge.restore_listening.is_set, 60, "the restore service")
    publish(broker, [Sent(f"devices/{unique}/t", b"secret payload")])
    wait_until(lambda: stored_count(data) == 1, 60, "the message to be stored")
    bridge.bridge.store.gaps.record(Gap(1, 2, "session-lost"))
    modes = {stat.S_IMODE(p.lstat().st_mode) for p in [data, *data.rglob("*")]}
    assert open_to_others(data) == []
    assert modes >= {0o700, 0o600}
    bridge.stop()
    assert open_to_others(data) == []
    assert os.umask(0o022) == 0o022, "the process umask is given back when the store closes"


@pytest.mark.usefixtures("umask_022")
def test_a_new_store_is_private_whatever_the_umask(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    outside = tmp_path / "disk2" / "p9"
    store = Store.open(data, 2)
    try:
        add_partition(store, "p9", str(outside))
    finally:
        store.close()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert open_to_others(data) == []
    assert open_to_others(outside) == []
    assert (outside / "CURRENT").is_file()


def test_modules_imported_while_the_store_is_open_leave_no_private_bytecode(
    broker: Broker, tmp_path: Path
) -> None:
    """Found in review: `run` imports the bridge while the store opens (umask 0077) on a thread.

    A package installed without its bytecode then got owner-only `__pycache__` folders and
    files, which other users cannot read. A fresh copy of the package, bytecode writing on.
    """
    pkg = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "mqtt_backup", pkg / "mqtt_backup", ignore=ignore)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_BACKUP_", "PYTHON"))}
    log = tmp_path / "bridge.log"
    with log.open("ab") as out:
        bridge = subprocess.Popen(
            [sys.executable, "-m", "mqtt_backup", "run", "--broker", broker.url, "--data", "data"],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(pkg)},
            umask=0o022,
            stdout=out,
            stderr=out,
        )
    try:
        wait_until(lambda: b"mqtt-backup running" in log.read_bytes(), 60, "the bridge to run")
    finally:
        bridge.terminate()
        bridge.wait(30)
    written = [p for p in pkg.rglob("*") if "__pycache__" in p.parts]
    assert any(p.suffix == ".pyc" for p in written), "the copy was imported, bytecode written"
    private = [
        f"{oct(stat.S_IMODE(p.stat().st_mode))} {p.relative_to(pkg)}"
        for p in written
        if stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044
    ]
    assert private == []
    assert open_to_others(tmp_path / "data") == []


def add_partition(store: Store, name: str, path: str) -> None:
    """`partitions add NAME --path PATH` on an open store."""
    moves.add(store, name, path)


def test_an_existing_open_store_is_tightened_and_says_so_once(
    store_v1: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Release 1 left its stores 0755/0644 (the fixture keeps that).
    assert open_to_others(store_v1)
    with caplog.at_level(logging.INFO, logger="mqtt_backup.storage.store"):
        Store.open(store_v1, create=False).close()
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1, said
        assert "private to its owner" in said[0]
        assert str(store_v1) in said[0]
        assert open_to_others(store_v1) == []
        caplog.clear()
        Store.open(store_v1, create=False).close()
        assert caplog.records == [], "already private: nothing more to say"
    assert exported(store_v1) == expected_v1()


def test_a_store_it_cannot_tighten_gives_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    Store.open(data, 2).close()
    data.chmod(0o755)
    real_chmod = Path.chmod

    def not_owner(path: Path, mode: int, **kwargs: Any) -> None:
        if path == data:
            raise PermissionError(1, "Operation not permitted")  # owned by another user
        real_chmod(path, mode, **kwargs)

    monkeypatch.setattr(Path, "chmod", not_owner)
    with caplog.at_level(logging.WARNING, logger="mqtt_backup.storage.store"):
        Store.open(data).close()
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert f"cannot make {data} private" in warned[0].getMessage()
    assert "chmod -R go=" in warned[0].getMessage()


# ---- the data directory's lock ------------------------------------------------------------------

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_the_lock_error_names_the_live_holder_not_a_stale_pid(tmp_path: Path) -> None:
    data = tmp_path / "data"
    Store.open(data, 2).close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (data / "LOCK").write_text(str(dead.pid))  # what a bridge killed long ago left behind
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(data / "LOCK")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(DataDirLocked) as caught:
            Store.open(data)
        message = caught.value.message()
        assert f"held by pid {holder.pid}" in message
        assert str(dead.pid) not in message
    finally:
        holder.kill()
        holder.wait()
    Store.open(data).close()


def test_a_lock_file_deleted_under_the_opener_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    Store.open(data, 2).close()
    real_flock = fcntl.flock
    deleted: list[bool] = []

    def deleted_first(fd: int, operation: int) -> None:
        if not deleted:  # another process removes the file between our open and our flock
            (data / "LOCK").unlink()
            deleted.append(True)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", deleted_first)
    store = Store.open(data)
    try:
        monkeypatch.undo()
        # The lock it holds is on the file every other opener finds, so none gets in beside it.
        with pytest.raises(DataDirLocked):
            DirLock(data).acquire()
    finally:
        store.close()


# ---- damaged RocksDB files ----------------------------------------------------------------------


def test_a_truncated_table_file_is_one_line_with_a_hint(store_v1: Path, closed_url: str) -> None:
    table = min((store_v1 / "partitions" / "p1").glob("*.sst"))
    with table.open("r+b") as handle:
        handle.truncate(table.stat().st_size // 3)
    for command in (["devices"], ["export"], ["run", "--broker", closed_url]):
        result = cli(*command, "--data", str(store_v1), cwd=store_v1.parent)
        line = one_line_error(result, EXIT_STORAGE)
        assert "partition p1" in line
        assert table.name in line
        assert "Try: restore the partition from a snapshot" in line
