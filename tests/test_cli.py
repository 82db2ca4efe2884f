"""The command line's own parts: --version, parameter types, `run` built from the settings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from mqtt_backup import __version__, config
from mqtt_backup.cli import app
from mqtt_backup.errors import EXIT_STORAGE, EXIT_USAGE
from mqtt_backup.records import Record
from mqtt_backup.restore.request import MIN_RATE
from mqtt_backup.storage import Pending, Store, StoreReader
from tests.test_cli_errors import REPO
from tests.test_partitions import fill

runner = CliRunner()
NO_BROKER = "mqtt://127.0.0.1:1"  # nothing listens on port 1


def invoke(*args: str) -> click.testing.Result:
    return runner.invoke(app, list(args))


def usage_error(*args: str) -> str:
    """The one line of a usage error (exit 2) of `mqtt-backup ARGS`, run in this process."""
    result = invoke(*args)
    assert result.exit_code == EXIT_USAGE, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("mqtt-backup: "), lines
    return lines[0]


# ---- --version ----------------------------------------------------------------------------------


def test_version_names_the_release_and_what_it_runs_on() -> None:
    result = invoke("--version")
    assert result.exit_code == 0, result.output
    pattern = (
        rf"^mqtt-backup {re.escape(__version__)} "
        r"\(python 3\.\d+\.\d+, paho-mqtt \S+, mqtt5 \S+, rocksdict \S+\)$"
    )
    assert re.match(pattern, result.stdout.strip()), result.stdout


def test_version_from_the_console_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mqtt_backup", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"mqtt-backup {__version__} (python ")


# ---- parameter types: refused while parsing, before anything is opened or connected ------------


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["forget", "dev-1", "--before", "yesterday"], "--before 'yesterday' is neither RFC 3339"),
        (["prune", "--older-than", "5 parsecs"], "--older-than '5 parsecs' is not a duration"),
        (["prune", "--older-than", "0d"], "--older-than '0d'"),
        (["export", "--topic", "a/#/b"], "topic filter 'a/#/b' misplaces a wildcard"),
        (["restore", "a/b"], "device 'a/b' must be one topic level"),
        (["restore", "+"], "device '+' must be one topic level"),
        # Found by a new user: export and forget took what restore refuses, and exited 0.
        (["export", "--device", "a/b"], "device 'a/b' must be one topic level"),
        (["export", "--device", "dev-1", "--device", "#"], "device '#' must be one topic level"),
        (["forget", "a/b"], "device 'a/b' must be one topic level"),
        (["forget", "+", "--dry-run"], "device '+' must be one topic level"),
        # Found by a new user: "weight must be a positive number, got 0.0", naming no option.
        (
            ["partitions", "add", "p9", "--weight", "0"],
            "--weight must be a finite number > 0, not 0",
        ),
        (["partitions", "add", "p9", "--weight", "-1"], "--weight must be a finite number > 0"),
        (["partitions", "add", "p9", "--weight", "inf"], "--weight must be a finite number > 0"),
        (["partitions", "add", "p9", "--weight", "nan"], "--weight must be a finite number > 0"),
        (["partitions", "add", "p9", "--weight", "x"], "--weight must be a finite number > 0"),
        (["restore", "dev-1", "--since", "2026-01-01T00:00:00"], "--since"),
        (["restore", "dev-1", "--until", "-1"], "--until must not be before 1970"),
        (["restore", "dev-1", "--topic", "x#"], "topic filter 'x#'"),
    ],
)
def test_bad_values_are_refused_at_parse_time(args: list[str], expect: str, tmp_path: Path) -> None:
    # No data directory and no broker: the value is refused before either would be needed.
    where = ["--broker", NO_BROKER] if args[0] == "restore" else ["--data", str(tmp_path / "none")]
    line = usage_error(*args, *where)
    assert expect in line
    assert not (tmp_path / "none").exists()


# ---- restore --rate -----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", ["1e-5", "0.001", "0.00999"])
def test_a_replay_rate_below_the_floor_is_a_usage_error(rate: str) -> None:
    # Found in review: the bridge refused it in an error reply, so the CLI exited 1, not 2.
    line = usage_error("restore", "dev-1", "--replay", "--rate", rate, "--broker", NO_BROKER)
    assert f"--rate must be at least {MIN_RATE} messages per second" in line


def test_the_floor_itself_is_a_rate() -> None:
    # Parsed, checked and sent: it fails only on the broker that is not there (exit 3).
    result = invoke(
        "restore",
        "dev-1",
        "--replay",
        "--rate",
        str(MIN_RATE),
        "--broker",
        NO_BROKER,
        "--timeout",
        "1",
    )
    assert result.exit_code == 3, result.output
    assert "cannot reach the broker" in result.stderr


def test_rate_without_replay_is_a_usage_error() -> None:
    # Found in review: --rate without --replay was silently ignored.
    line = usage_error("restore", "dev-1", "--rate", "5", "--broker", NO_BROKER)
    assert "--rate paces a replay" in line
    assert "Try: add --replay" in line


# ---- run: one flag per declared setting ---------------------------------------------------------


def run_command() -> click.Command:
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return group.commands["run"]


def test_run_has_a_flag_for_every_setting_with_its_declared_help() -> None:
    options = {p.opts[0]: p for p in run_command().params if isinstance(p, click.Option)}
    flagged = [n for n in config.field_names() if not config.declared(n).env_only]
    for name in flagged:
        flag = config.flag_name(name)
        assert flag in options, f"setting {name} has no run flag"
        assert options[flag].help == config.help_for(name)
    assert set(options) == {config.flag_name(n) for n in flagged} | {"--config"}


def test_a_secret_setting_is_never_a_flag() -> None:
    # `ps` shows flags: the password comes from --password-file or MQTT_BACKUP_PASSWORD only.
    assert config.declared("password").env_only
    line = usage_error("run", "--password", "hunter2")
    assert "No such option '--password'" in line
    assert "?. Try" not in line
    assert "hunter2" not in line


def test_run_flags_win_over_environment_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The order is config.load's; here: run hands it only the flags that were given.
    (tmp_path / "bridge.toml").write_text('namespace = "from-file"\nkeepalive = 60\n')
    monkeypatch.setenv(config.env_name("namespace"), "from-env")
    monkeypatch.setenv(config.env_name("keepalive"), "70")
    seen: list[config.Settings] = []

    class Stop(Exception):
        pass

    def capture(settings: config.Settings) -> None:
        seen.append(settings)
        raise Stop

    monkeypatch.setattr("mqtt_backup.startup.Startup", capture)  # the first to take the settings
    result = invoke("run", "--config", str(tmp_path / "bridge.toml"), "--keepalive", "80")
    assert result.exit_code == 1, result.output  # Stop is no BackupError: an internal error
    (settings,) = seen
    assert (settings.namespace, settings.keepalive) == ("from-env", 80)
    assert settings.topic == ("devices/{device}/#",), "an unset repeatable flag keeps the default"


# ---- partitions add --path ----------------------------------------------------------------------


def test_a_relative_partition_path_is_relative_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found in review: `--path disk2/p3` meant <data>/disk2/p3 (and was refused as lying among
    # the store's files), not ./disk2/p3 as any path typed in a shell.
    data, here = tmp_path / "data", tmp_path / "mnt"
    fill(data, devices=20)
    here.mkdir()
    monkeypatch.chdir(here)
    result = invoke("partitions", "add", "p3", "--path", "disk2/p3", "--data", str(data))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"adding p3 at {here / 'disk2' / 'p3'}: moved "), result.stdout
    assert (here / "disk2" / "p3" / "CURRENT").is_file()
    with StoreReader(data) as reader:
        (spec,) = [s for s in reader.manifest.partitions if s.name == "p3"]
    assert spec.path == str(here / "disk2" / "p3")


def test_a_partition_path_inside_the_data_directory_stays_relative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The manifest keeps `partitions/NAME`, so the data directory can move as a whole.
    data = tmp_path / "data"
    fill(data, devices=20)
    monkeypatch.chdir(data)
    dry = invoke(
        "partitions", "add", "p3", "--path", "partitions/p3", "--data", ".", "--json", "--dry-run"
    )
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["path"] == str(data.resolve() / "partitions" / "p3")
    result = invoke("partitions", "add", "p3", "--path", "partitions/p3", "--data", ".")
    assert result.exit_code == 0, result.output
    with StoreReader(data) as reader:
        (spec,) = [s for s in reader.manifest.partitions if s.name == "p3"]
    assert spec.path == "partitions/p3"


def test_the_default_partition_path_is_shown_absolute(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fill(data, devices=10)
    result = invoke("partitions", "add", "p3", "--data", str(data), "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"adding p3 at {data / 'partitions' / 'p3'}: would move ")


# ---- web: the command around mqtt_backup.web.run_web -------------------------------------------


def test_web_refuses_an_open_address_without_a_token(tmp_path: Path) -> None:
    line = usage_error("web", "--data", str(tmp_path), "--bind", "0.0.0.0:8099")
    assert "no token is set" in line
    assert "--token-file" in line


def test_web_on_a_directory_without_a_store_is_a_storage_error(tmp_path: Path) -> None:
    result = invoke("web", "--data", str(tmp_path / "none"), "--bind", "127.0.0.1:0")
    assert result.exit_code == EXIT_STORAGE, result.output
    assert "no data directory" in result.stderr


def test_one_message_is_one_message() -> None:
    # Found in review: "restored 1 messages".
    from mqtt_backup.cli.restore import _summary  # noqa: PLC0415 - the one helper under test

    assert (
        _summary("d1", {"count": 1, "complete": True}, 1) == "restored 1 message of d1 (complete)"
    )
    assert (
        _summary("d1", {"count": 2, "complete": True}, 2) == "restored 2 messages of d1 (complete)"
    )


def test_the_summary_says_when_broker_drops_are_unknown() -> None:
    # Found by a new-user run against a broker without $SYS: the bridge's `done` said
    # "broker_drops": "unknown", and `mqtt-backup restore` summed it up as "(complete)".
    from mqtt_backup.cli.restore import _completeness, _summary  # noqa: PLC0415 - under test
    from mqtt_backup.restore.gather import Gathered, Stream  # noqa: PLC0415 - its input

    unknown = {"count": 1, "complete": True, "broker_drops": "unknown"}
    assert _summary("d1", unknown, 1) == (
        "restored 1 message of d1 (complete as far as the bridge can see; broker drops unknown: "
        "the broker's dropped-message counter was out of its sight)"
    )
    gap = {"since": "a", "until": "b", "reason": "downtime"}
    incomplete = {**unknown, "complete": False, "gaps": [gap]}
    assert _summary("d1", incomplete, 1).endswith("in a .. b (downtime); broker drops unknown)")
    known = Stream("b1", terminal={"count": 1, "complete": True})
    blind = Stream("b2", terminal=unknown)
    assert _completeness(Gathered({"b1": known}, [])) == " (complete)"
    assert _completeness(Gathered({"b1": known, "b2": blind}, [])).startswith(
        " (complete as far as the bridges can see; broker drops unknown"
    )


def test_counts_in_summaries_agree_with_their_number() -> None:
    # Found by a new-user run: "would delete 1 messages", "(+1 retained statuses)".
    from mqtt_backup.cli.output import count  # noqa: PLC0415 - the one helper under test

    assert count(1, "message") == "1 message"
    assert count(0, "message") == "0 messages"
    assert count(1, "retained status", "retained statuses") == "1 retained status"
    assert count(2, "retained status", "retained statuses") == "2 retained statuses"


def test_a_one_partition_store_says_one_partition(tmp_path: Path) -> None:
    # Found by a new-user run: a new data directory has one partition, and `verify` and
    # `snapshot` said "ok: 1 partitions, ..." and "snapshot of 1 partitions written to ...".
    data = tmp_path / "data"
    store = Store.open(data, partitions=1)
    try:
        partition, dev_key = store.locate("dev-1")
        store.write(partition, [Pending("dev-1", dev_key, 10**18, Record("devices/dev-1/t", b"x"))])
    finally:
        store.close()
    verified = invoke("verify", "--data", str(data))
    assert verified.exit_code == 0, verified.output
    assert re.match(
        r"ok: 1 partition, 1 device, 1 record, 0 redelivered copies, \d+ bytes$",
        verified.stdout.strip(),
    ), verified.stdout
    snap = invoke("snapshot", str(tmp_path / "snap"), "--data", str(data))
    assert snap.exit_code == 0, snap.output
    assert snap.stdout.startswith("snapshot of 1 partition written to "), snap.stdout


def test_forget_of_one_message_says_one_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fill(data, devices=1, per_device=1)
    result = invoke("forget", "dev-0000", "--data", str(data), "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("would delete 1 message ("), result.stdout


def test_forget_of_a_device_not_stored_says_so(tmp_path: Path) -> None:
    # A mistyped id answered "deleted 0 messages (0 bytes) of dev-9999", as if it had worked.
    data = tmp_path / "data"
    fill(data, devices=1, per_device=1)
    result = invoke("forget", "dev-9999", "--data", str(data))
    assert result.exit_code == 0, result.output  # forgetting twice is no error
    assert result.stdout.strip() == (
        "deleted 0 messages (0 bytes) of dev-9999: nothing of it is stored; "
        "`mqtt-backup devices` lists the stored ids"
    )
    # With --before the result cannot tell "nothing before then" from "nothing at all".
    before = invoke("forget", "dev-9999", "--before", "2020-01-01T00:00:00Z", "--data", str(data))
    assert before.exit_code == 0, before.output
    assert before.stdout.strip() == (
        "deleted 0 messages (0 bytes) of dev-9999: nothing of it is stored before that time "
        "(if anything at all); `mqtt-backup devices` lists the stored ids"
    )
