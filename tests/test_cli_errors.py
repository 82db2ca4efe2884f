"""Bad input gets one clear line on stderr and a meaningful exit code, never a traceback.

Most cases run the command line in this process through typer's CliRunner, which goes through
the same error mapping as the console script (`Root.main`), in an empty directory and without any
MQTT_BACKUP_* variable. A few run the real entry point in a subprocess (`python -m mqtt_backup`):
exit codes, one line, no traceback, as a user's shell sees them.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mqtt_backup.cli import app
from mqtt_backup.config import ENV_PREFIX
from mqtt_backup.errors import EXIT_BROKER, EXIT_STORAGE, EXIT_USAGE
from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store
from mqtt_backup.storage.manifest import manifest_path
from tests.conftest import Broker, bridge_process, wait_until
from tools.devbroker import free_port

REPO = Path(__file__).resolve().parent.parent
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
BASE_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z


# ---- helpers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    """What a command line did: its exit code and output."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, cwd: Path, env: Mapping[str, str] | None = None) -> Ran:
    """Run `mqtt-backup ARGS` in this process, in `cwd`, with `env` added to the environment."""
    with contextlib.chdir(cwd):
        result = CliRunner().invoke(app, list(args), env=dict(env or {}))
    return Ran(result.exit_code, result.stdout, result.stderr)


def process(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run `python -m mqtt_backup ARGS` in `cwd` with a clean environment plus `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    clean["PYTHONPATH"] = str(REPO)
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mqtt_backup", *args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line_error(result: Ran | subprocess.CompletedProcess[str], code: int) -> str:
    """Assert exit `code`, one `mqtt-backup:` line on stderr and no traceback; return the line."""
    shown = f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.returncode == code, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1, shown
    assert lines[0].startswith("mqtt-backup: "), shown
    return lines[0]


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    """An empty working directory for the subprocess (no ./mqtt-backup.toml, no data)."""
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def closed_url() -> str:
    """A broker URL on a port nothing listens on."""
    return f"mqtt://127.0.0.1:{free_port()}"


def fill(data: Path, messages: Mapping[str, list[tuple[str, bytes]]], partitions: int = 3) -> None:
    """Store {device: [(topic, payload)...]} directly, 1 ms apart from 2026-01-01."""
    store = Store.open(data, partitions)
    try:
        clock = BASE_NS
        for device, items in messages.items():
            partition, dev_key = store.locate(device)
            batch = []
            for topic, payload in items:
                clock += 1_000_000
                batch.append(Pending(device, dev_key, clock, Record(topic, payload)))
            store.write(partition, batch)
    finally:
        store.close()


# ---- the command line itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--bogus"], "--bogus"),
        (["run", "--bogus"], "--bogus"),
        (["devices", "--bogus"], "--bogus"),
        (["run", "--partitions"], "--partitions"),
        (["export", "--since"], "--since"),
        (["run", "--partitions", "x"], "'x'"),
        (["run", "--batch-max", "1.5"], "--batch-max"),
        (["export", "--format", "xml"], "xml"),
        (["devices", "--sort", "size"], "size"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_command_line(cwd: Path, args: list[str], expect: str) -> None:
    line = one_line_error(cli(*args, cwd=cwd), EXIT_USAGE)
    assert expect in line
    assert "Try:" in line
    assert list(cwd.iterdir()) == []


def test_usage_hint_names_the_subcommand(cwd: Path) -> None:
    line = one_line_error(process("run", "--partitions", cwd=cwd), EXIT_USAGE)
    assert "mqtt-backup run --help" in line


def test_no_arguments_shows_usage_unmangled(cwd: Path) -> None:
    result = process(cwd=cwd)
    assert result.returncode in (0, EXIT_USAGE)
    shown = result.stdout + result.stderr
    assert "Traceback" not in shown
    assert "Commands:" in shown
    # The help text is not a one-line error: no "mqtt-backup: Usage:" prefix, no hint glued on.
    assert not shown.startswith("mqtt-backup: Usage:"), shown
    assert ". Try: mqtt-backup --help" not in shown, shown


# ---- configuration ------------------------------------------------------------------------------


def test_config_file_missing(cwd: Path) -> None:
    line = one_line_error(cli("run", "--config", "nope.toml", cwd=cwd), EXIT_USAGE)
    assert "nope.toml" in line
    assert "does not exist" in line


def test_config_file_is_a_directory(cwd: Path) -> None:
    (cwd / "conf.d").mkdir()
    line = one_line_error(cli("devices", "--config", "conf.d", cwd=cwd), EXIT_USAGE)
    assert "conf.d" in line


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("broker = \n", "not valid TOML"),
        ("[broker\n", "not valid TOML"),
        ('brokr = "mqtt://x"\n', "'brokr'"),
        ('partitions = "three"\n', "'partitions'"),
        ("topic = 5\n", "'topic'"),
    ],
)
def test_bad_config_file(cwd: Path, content: str, expect: str) -> None:
    (cwd / "bridge.toml").write_text(content, encoding="utf-8")
    line = one_line_error(cli("run", "--config", "bridge.toml", cwd=cwd), EXIT_USAGE)
    assert "bridge.toml" in line
    assert expect in line


def test_bad_default_config_file_is_reported(cwd: Path) -> None:
    (cwd / "mqtt-backup.toml").write_text('brokr = "x"\n', encoding="utf-8")
    line = one_line_error(cli("devices", cwd=cwd), EXIT_USAGE)
    assert "mqtt-backup.toml" in line
    assert "'brokr'" in line


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PARTITIONS", "zero"),
        ("PARTITIONS", "0"),
        ("BATCH_MS", "fast"),
        ("BROKER", "ftp://x"),
    ],
)
def test_bad_environment_variable_is_named(cwd: Path, name: str, value: str) -> None:
    result = cli("run", cwd=cwd, env={ENV_PREFIX + name: value})
    line = one_line_error(result, EXIT_USAGE)
    assert ENV_PREFIX + name in line


@pytest.mark.parametrize(
    ("url", "expect"),
    [
        ("ftp://x", "mqtt://"),
        ("mqtt://", "no host"),
        ("mqtt://host:99999", "99999"),
        ("mqtt://host:port", "host:***"),  # a port that is no number may be a password
        ("mqtt://host/path", "path"),
        ("127.0.0.1:1883", "mqtt://"),
    ],
)
def test_bad_broker_url(cwd: Path, url: str, expect: str) -> None:
    line = one_line_error(cli("run", "--broker", url, cwd=cwd), EXIT_USAGE)
    assert expect in line
    assert not (cwd / "mqtt-backup-data").exists()


@pytest.mark.parametrize("source", ["flag", "env", "toml"])
@pytest.mark.parametrize(
    "url",
    ["mqtt://bridge:hunter2@host/x", "mqtt://bridge:pa/hunter2@host", "mqtt://bridge:hunter2"],
)
def test_a_bad_broker_url_never_shows_its_password(cwd: Path, source: str, url: str) -> None:
    match source:
        case "flag":
            result = cli("run", "--broker", url, cwd=cwd)
        case "env":
            result = cli("run", cwd=cwd, env={f"{ENV_PREFIX}BROKER": url})
        case _:
            (cwd / "mqtt-backup.toml").write_text(f"broker = {json.dumps(url)}\n")
            result = cli("run", cwd=cwd)
    line = one_line_error(result, EXIT_USAGE)
    assert "hunter2" not in result.stderr + result.stdout
    assert "bridge:***" in line


@pytest.mark.parametrize(
    ("template", "expect"),
    [
        ("devices/x/#", "has no"),
        ("{device}/{device}", "has 2"),
        ("devices/x{device}/#", "embeds"),
        ("devices/{device}/#/x", "wildcard"),
        ("backup/{device}", "namespace"),
        ("", "empty"),
    ],
)
def test_bad_topic_template(cwd: Path, closed_url: str, template: str, expect: str) -> None:
    result = cli("run", "--broker", closed_url, "--topic", template, cwd=cwd)
    line = one_line_error(result, EXIT_USAGE)
    assert expect in line
    assert not (cwd / "mqtt-backup-data").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--partitions", "0"),
        ("--protocol", "4"),
        ("--log-level", "loud"),
        ("--namespace", "a/+"),
        ("--client-id", ""),
    ],
)
def test_bad_run_option(cwd: Path, closed_url: str, flag: str, value: str) -> None:
    line = one_line_error(cli("run", "--broker", closed_url, flag, value, cwd=cwd), EXIT_USAGE)
    assert "bad configuration" in line


# ---- broker -------------------------------------------------------------------------------------


def test_unreachable_broker_fails_and_leaves_nothing_behind(cwd: Path, closed_url: str) -> None:
    # It must not hang: a subprocess still running after 15 s fails the test (TimeoutExpired).
    result = process("run", "--broker", closed_url, "--data", "data", cwd=cwd)
    line = one_line_error(result, EXIT_BROKER)
    assert closed_url.removeprefix("mqtt://") in line
    assert "Try:" in line
    assert not (cwd / "data").exists(), "a failed start must not leave a new data directory"


@pytest.mark.slow  # two bridge processes; test_ingest_e2e has the lock within one process
def test_locked_data_dir(broker: Broker, tmp_path: Path, cwd: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "bridge.log"
    first = bridge_process(broker, data, log=log)
    try:
        wait_until(
            lambda: manifest_path(data).exists() and b"running" in log.read_bytes(),
            20,
            "the first bridge to run",
        )
        result = process("run", "--broker", broker.url, "--data", str(data), cwd=cwd)
        line = one_line_error(result, EXIT_STORAGE)
        assert "in use" in line
        assert f"held by pid {first.pid}" in line
        assert first.poll() is None, "the second bridge must not disturb the first"
    finally:
        first.terminate()
        first.wait(timeout=30)


# ---- storage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "devices", "export"])
def test_data_dir_is_a_file(cwd: Path, closed_url: str, command: str) -> None:
    (cwd / "data").write_text("not a directory", encoding="utf-8")
    args = ["--broker", closed_url] if command == "run" else []
    line = one_line_error(cli(command, "--data", "data", *args, cwd=cwd), EXIT_STORAGE)
    assert "data" in line


def test_data_dir_under_a_file(cwd: Path, closed_url: str) -> None:
    (cwd / "file").write_text("x", encoding="utf-8")
    result = cli("run", "--broker", closed_url, "--data", "file/data", cwd=cwd)
    line = one_line_error(result, EXIT_STORAGE)
    assert "file/data" in line


@pytest.mark.parametrize("command", ["devices", "export"])
@pytest.mark.parametrize("where", ["missing", "empty"])
def test_read_command_without_data(cwd: Path, command: str, where: str) -> None:
    if where == "empty":
        (cwd / "d").mkdir()
    line = one_line_error(cli(command, "--data", "d", cwd=cwd), EXIT_STORAGE)
    assert "Try:" in line
    assert "manifest.json" in line
    if where == "missing":
        assert not (cwd / "d").exists(), "a read command must not create the data directory"


def test_a_partition_path_among_the_stores_files_is_named_as_typed(cwd: Path) -> None:
    # Found in use: the error named `--path p7` (the path relative to the data directory) for
    # `--path mqtt-backup-data/p7`, and its hint `partitions/p7` meant ./partitions/p7.
    Store.open(cwd / "mqtt-backup-data", 3).close()
    typed = "mqtt-backup-data/p7"
    line = one_line_error(cli("partitions", "add", "p7", "--path", typed, cwd=cwd), EXIT_USAGE)
    assert f"--path {typed} lies among the data directory's own files" in line
    assert "--path p7" not in line
    assert "leave --path out" in line
    assert not (cwd / typed).exists()


def test_a_partition_path_over_another_partition_is_named_as_typed(cwd: Path) -> None:
    Store.open(cwd / "mqtt-backup-data", 3).close()
    typed = "mqtt-backup-data/partitions/p0"
    line = one_line_error(cli("partitions", "add", "p7", "--path", typed, cwd=cwd), EXIT_USAGE)
    assert f"--path {typed}: partitions p7 and p0 overlap" in line
    assert "--path partitions/p0" not in line


def test_partition_count_mismatch(cwd: Path, closed_url: str) -> None:
    Store.open(cwd / "data", 3).close()
    result = cli("run", "--broker", closed_url, "--data", "data", "--partitions", "5", cwd=cwd)
    line = one_line_error(result, EXIT_USAGE)
    assert "partitions add/remove" in line
    assert "3 partitions" in line


def test_corrupt_manifest(cwd: Path) -> None:
    Store.open(cwd / "data", 3).close()
    manifest_path(cwd / "data").write_text("{not json", encoding="utf-8")
    for command in ("devices", "export"):
        line = one_line_error(cli(command, "--data", "data", cwd=cwd), EXIT_STORAGE)
        assert "manifest.json" in line


# ---- export arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--since", "garbage"], "--since"),
        (["--until", "yesterday"], "--until"),
        (["--since", "2026-01-01T00:00:00"], "time zone"),
        (["--since", "-5"], "1970"),
        (["--since", "2026-01-02T00:00:00Z", "--until", "2026-01-01T00:00:00Z"], "--since"),
        (["--topic", "a/#/b"], "a/#/b"),
        (["--topic", "a/b+"], "a/b+"),
    ],
)
def test_bad_export_arguments(cwd: Path, args: list[str], expect: str) -> None:
    fill(cwd / "data", {"dev-1": [("devices/dev-1/t", b"x")]})
    line = one_line_error(cli("export", "--data", "data", *args, cwd=cwd), EXIT_USAGE)
    assert expect in line


@pytest.mark.parametrize(
    "args",
    [
        ["--since", "99999999999999999999"],
        ["--until", "99999999999999999999"],
        ["--since", "9999-12-31T23:59:59Z"],
    ],
)
def test_export_time_beyond_the_key_range(cwd: Path, args: list[str]) -> None:
    # Times past 2554 do not fit the key's 64-bit nanoseconds: an error, or simply nothing/all.
    fill(cwd / "data", {"dev-1": [("devices/dev-1/t", b"x")]})
    result = cli("export", "--data", "data", *args, cwd=cwd)
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode != 0:
        one_line_error(result, EXIT_USAGE)


def test_export_to_an_unwritable_file(cwd: Path) -> None:
    fill(cwd / "data", {"dev-1": [("devices/dev-1/t", b"x")]})
    (cwd / "out").mkdir()
    line = one_line_error(cli("export", "--data", "data", "--output", "out", cwd=cwd), EXIT_USAGE)
    assert "out" in line


# ---- happy paths through typer's CliRunner ------------------------------------------------------

BINARY = bytes(range(256)) + b"\x00\xff\xfe"
FLEET: dict[str, list[tuple[str, bytes]]] = {
    "dev-a": [("devices/dev-a/temp", b"21.5"), ("devices/dev-a/bin", BINARY)],
    "dev-b": [("devices/dev-b/temp", f"{n}".encode()) for n in range(5)],
    "dev-c": [("devices/dev-c/status", "caf\u00e9".encode()), ("devices/dev-c/temp", b"")],
}


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A data directory holding FLEET."""
    data = tmp_path / "filled"
    fill(data, FLEET)
    return data


@pytest.fixture
def runner() -> CliRunner:
    """typer's test runner."""
    return CliRunner()


def test_devices_json(runner: CliRunner, filled: Path) -> None:
    result = runner.invoke(app, ["devices", "--data", str(filled), "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [d["device"] for d in listed] == ["dev-a", "dev-b", "dev-c"]
    keys = {"device", "first", "last", "count", "bytes", "duplicates", "partition"}
    for entry in listed:
        assert set(entry) == keys
        assert TS.match(entry["first"])
        assert TS.match(entry["last"])
        assert entry["first"] <= entry["last"]
        assert entry["count"] == len(FLEET[entry["device"]])
        assert entry["bytes"] > 0
        assert entry["duplicates"] == 0
        assert entry["partition"] in {"p0", "p1", "p2"}
    assert listed[0]["first"] == "2026-01-01T00:00:00.001000000Z"


def test_devices_sort_count(runner: CliRunner, filled: Path) -> None:
    result = runner.invoke(app, ["devices", "--data", str(filled), "--json", "--sort", "count"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [d["count"] for d in listed] == [5, 2, 2]
    assert listed[0]["device"] == "dev-b"


def test_devices_table(runner: CliRunner, filled: Path) -> None:
    result = runner.invoke(app, ["devices", "--data", str(filled)])
    assert result.exit_code == 0, result.output
    for device in FLEET:
        assert device in result.stdout


def test_devices_json_on_an_empty_store(runner: CliRunner, tmp_path: Path) -> None:
    Store.open(tmp_path / "empty", 3).close()
    result = runner.invoke(app, ["devices", "--data", str(tmp_path / "empty"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


def decoded(line: dict[str, object]) -> bytes:
    """The payload bytes of an export line."""
    payload = line["payload"]
    assert isinstance(payload, str)
    if line["encoding"] == "base64":
        return base64.b64decode(payload)
    assert line["encoding"] == "utf8"
    return payload.encode()


def test_export_jsonl(runner: CliRunner, filled: Path) -> None:
    result = runner.invoke(app, ["export", "--data", str(filled)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(text) for text in result.stdout.splitlines()]
    keys = {"device", "topic", "ts", "qos", "retain", "dup", "encoding", "payload"}
    assert all(set(line) == keys for line in lines)
    assert all(TS.match(line["ts"]) for line in lines)
    got = {d: [(x["topic"], decoded(x)) for x in lines if x["device"] == d] for d in FLEET}
    assert got == FLEET
    binary = next(x for x in lines if x["topic"] == "devices/dev-a/bin")
    assert binary["encoding"] == "base64"
    assert (binary["qos"], binary["retain"], binary["dup"]) == (1, False, False)
    text = next(x for x in lines if x["topic"] == "devices/dev-c/status")
    assert (text["encoding"], text["payload"]) == ("utf8", "caf\u00e9")


def test_export_selects(runner: CliRunner, filled: Path) -> None:
    args = ["export", "--data", str(filled), "--device", "dev-b", "--topic", "devices/+/temp"]
    window = ["--since", "2026-01-01T00:00:00.004Z", "--until", "2026-01-01T00:00:00.006Z"]
    result = runner.invoke(app, [*args, *window])
    assert result.exit_code == 0, result.output
    lines = [json.loads(text) for text in result.stdout.splitlines()]
    assert [x["payload"] for x in lines] == ["1", "2"]
    assert [x["ts"] for x in lines] == [
        "2026-01-01T00:00:00.004000000Z",
        "2026-01-01T00:00:00.005000000Z",
    ]
    unknown = runner.invoke(app, ["export", "--data", str(filled), "--device", "nobody"])
    assert unknown.exit_code == 0, unknown.output
    assert unknown.stdout == ""


def test_export_csv(runner: CliRunner, filled: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    args = ["export", "--data", str(filled), "--format", "csv", "--output", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert rows[0] == ["device", "topic", "ts", "qos", "retain", "dup", "encoding", "payload"]
    assert len(rows) == 1 + sum(len(v) for v in FLEET.values())
    binary = next(r for r in rows if r[1] == "devices/dev-a/bin")
    assert binary[6] == "base64"
    assert base64.b64decode(binary[7]) == BINARY
    assert binary[4:6] == ["false", "false"]
    assert all(TS.match(r[2]) for r in rows[1:])


def test_runner_reports_errors_as_one_line(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["devices", "--data", str(tmp_path / "none")])
    assert result.exit_code == EXIT_STORAGE
    assert result.stderr.startswith("mqtt-backup: no data directory")
    assert len(result.stderr.splitlines()) == 1


def test_a_failed_start_leaves_an_existing_directory_as_it_was(
    cwd: Path, closed_url: str, tmp_path: Path
) -> None:
    empty = cwd / "empty"
    (empty / "lost+found").mkdir(parents=True)  # a freshly mounted volume counts as empty
    result = cli("run", "--broker", closed_url, "--data", str(empty), cwd=cwd)
    one_line_error(result, EXIT_BROKER)
    assert sorted(p.name for p in empty.iterdir()) == ["lost+found"]
    # A directory holding someone's files is not adopted at all (tests/test_store_safety.py).
    (empty / "notes.txt").write_text("mine")
    result = cli("run", "--broker", closed_url, "--data", str(empty), cwd=cwd)
    assert "not an mqtt-backup data directory" in one_line_error(result, EXIT_STORAGE)
    assert sorted(p.name for p in empty.iterdir()) == ["lost+found", "notes.txt"]
    # An existing store keeps its client id when a start with another one fails.
    data = tmp_path / "store"
    Store.open(data, partitions=2).close()
    before = json.loads((data / "manifest.json").read_text())["client_id"]
    refused = cli(
        "run",
        "--broker",
        closed_url,
        "--data",
        str(data),
        "--client-id",
        "typo",
        cwd=cwd,
    )
    one_line_error(refused, EXIT_BROKER)
    assert json.loads((data / "manifest.json").read_text())["client_id"] == before


@pytest.mark.parametrize("device", ["[red]x[", "[bold]b[/bold]", ":smile:", "a\\[b]"])
def test_tables_show_device_ids_as_they_are(runner: CliRunner, tmp_path: Path, device: str) -> None:
    data = tmp_path / "data"
    fill(data, {device: [(f"devices/{device}/t", b"1")]})
    listed = runner.invoke(app, ["devices", "--data", str(data)])
    assert listed.exit_code == 0, listed.output
    assert f" {device} " in listed.stdout
    dry = runner.invoke(app, ["prune", "--older-than", "1d", "--data", str(data), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f" {device} " in dry.stdout  # the table of what it would delete


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("restor",), "No such command 'restor'. Did you mean 'restore'? Try: mqtt-backup --help"),
        (
            ("partitions", "ad"),
            "No such command 'ad'. Did you mean 'add'? Try: mqtt-backup partitions --help",
        ),
    ],
)
def test_a_mistyped_command_is_suggested_once(args: tuple[str, ...], said: str, cwd: Path) -> None:
    # click and typer both suggested a command, so the hint came twice.
    assert one_line_error(cli(*args, cwd=cwd), EXIT_USAGE) == f"mqtt-backup: {said}"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--weight", "5"], "--weight 5"),
        (["--path", "elsewhere/p0"], "--path elsewhere/p0"),
        (["--path", "elsewhere/p0", "--weight", "2"], "--path elsewhere/p0"),
    ],
)
def test_adding_an_existing_partition_with_other_flags_is_refused(
    cwd: Path, flags: list[str], named: str
) -> None:
    # Found by a new user: the add printed "adding p0 at ...: moved 0 devices", exit 0, and
    # nothing changed (the branch that finishes an interrupted add took it).
    Store.open(cwd / "mqtt-backup-data", 3).close()
    before = manifest_path(cwd / "mqtt-backup-data").read_bytes()
    line = one_line_error(cli("partitions", "add", "p0", *flags, cwd=cwd), EXIT_USAGE)
    home = (cwd / "mqtt-backup-data").resolve()
    assert f"partition p0 exists already at {home / 'partitions' / 'p0'} with weight 1" in line
    assert named in line
    assert "Try:" in line
    assert "partitions remove p0" in line
    assert manifest_path(cwd / "mqtt-backup-data").read_bytes() == before
    assert not (cwd / "elsewhere").exists()


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--weight", "2"],
        ["--path", "other/p4"],
        ["--path", "other/p4", "--weight", "2"],
    ],
)
def test_rerunning_the_same_add_finishes_it(cwd: Path, flags: list[str]) -> None:
    Store.open(cwd / "mqtt-backup-data", 3).close()
    first = cli("partitions", "add", "p4", "--path", "other/p4", "--weight", "2", cwd=cwd)
    assert first.returncode == 0, first
    again = cli("partitions", "add", "p4", *flags, cwd=cwd)
    assert again.returncode == 0, again
    # Where p4 is, not where a new p4 would go.
    assert f"adding p4 at {(cwd / 'other' / 'p4').resolve()}: moved 0 devices" in again.stdout


def test_the_empty_device_id_of_an_empty_topic_level_can_be_exported_and_forgotten(
    cwd: Path,
) -> None:
    # `devices//x` is stored as the device "": no restore topic can name it, but it is stored.
    fill(cwd / "data", {"": [("devices//x", b"1")], "dev-1": [("devices/dev-1/x", b"2")]})
    exported = cli("export", "--data", "data", "--device", "", cwd=cwd)
    assert exported.returncode == 0, exported
    assert [json.loads(line)["topic"] for line in exported.stdout.splitlines()] == ["devices//x"]
    forgotten = cli("forget", "", "--data", "data", "--json", cwd=cwd)
    assert forgotten.returncode == 0, forgotten
    assert json.loads(forgotten.stdout)["messages"] == 1


@pytest.mark.parametrize(
    ("command", "said"),
    [
        # `--output FILE` on a full disk said "cannot write FILE: No space left on device"; the
        # same on stdout (`> file` on a full disk) was "internal error: OSError ... report it".
        ("export", "cannot write the standard output"),
        # The tables go through rich, not `output_file`: the same internal error, later.
        ("devices", "cannot write the output"),
        ("stats", "cannot write the output"),
    ],
)
def test_output_to_a_full_stdout_says_so_in_one_line(cwd: Path, command: str, said: str) -> None:
    fill(cwd / "data", {"d1": [("devices/d1/t", b"x")]})
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    clean["PYTHONPATH"] = str(REPO)
    with Path("/dev/full").open("w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "mqtt_backup", command, "--data", "data"],
            cwd=cwd,
            env=clean,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    shown = f"exit {result.returncode}\nstderr: {result.stderr}"
    assert result.returncode == EXIT_USAGE, shown
    assert result.stderr.splitlines() == [f"mqtt-backup: {said}: No space left on device"], shown
