"""The command line imports a command's module only when that command runs (or --help lists it).

`run` is on the restart path (kill -9 to ingesting again): it must not pay for rich, the web
view's starlette/uvicorn/jinja2, the other commands' modules, nor (on the default asyncio
transport) paho and aiomqtt (docs/design-notes.md, "Start-up").
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import typer

from mqtt_backup.cli import maintenance, read, restore, simulate, status, web
from mqtt_backup.cli.main import COMMAND_MODULES, module_commands
from tests.conftest import REPO, Broker, Sent, publish_async, stored_count, wait_until

# Never imported by `mqtt-backup run` (nor by --version, --help of run, or a usage error).
NOT_FOR_RUN = (
    "rich",
    "starlette",
    "uvicorn",
    "jinja2",
    "mqtt_backup.web",
    "mqtt_backup.simulate",
    "mqtt_backup.restore.client",
    "mqtt_backup.restore.gather",
    *(f"mqtt_backup.cli.{m}" for m in ("read", "restore", "status", "maintenance", "simulate")),
    "importlib.metadata",  # --version's only
    "tomllib",  # only with a config file
)
# Nor by a running bridge on the default transport (MQTT 5, asyncio): only --protocol 3.1.1 and
# --transport paho need them.
MQTT_CLIENTS = ("paho", "aiomqtt")


def _imported_by(code: str) -> set[str]:
    probe = f"import sys\n{code}\nimport json; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in NOT_FOR_RUN))


def test_the_command_table_lists_every_command_of_each_module_in_order() -> None:
    # What the root held when every module was added eagerly, in that order.
    eager = typer.Typer()
    for module in (read, restore, status, maintenance, simulate, web):
        eager.add_typer(module.app)
    eager.callback()(lambda: None)
    group = typer.main.get_command(eager)
    assert isinstance(group, typer.core.TyperGroup)
    assert list(COMMAND_MODULES) == list(group.commands)
    for name, where in COMMAND_MODULES.items():
        assert name in module_commands(where)


def test_the_root_lists_its_commands_without_importing_them() -> None:
    code = (
        "import typer\nfrom mqtt_backup.cli.main import app\n"
        "root = typer.main.get_command(app)\nprint(list(root.commands))"
    )
    assert _heavy(_imported_by(code)) == []
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(["run", *COMMAND_MODULES])


def test_run_imports_neither_the_other_commands_nor_rich_nor_the_web_view() -> None:
    # The bridge module is what `run` imports once its settings hold.
    modules = _imported_by("import mqtt_backup.cli.main\nimport mqtt_backup.bridge")
    assert "mqtt_backup.bridge" in modules
    assert _heavy(modules) == []


def test_looking_a_command_up_imports_its_module_only() -> None:
    code = (
        "import typer\nfrom mqtt_backup.cli.main import app\n"
        "root = typer.main.get_command(app)\nassert root.get_command(None, 'stats') is not None"
    )
    modules = _imported_by(code)
    assert "mqtt_backup.cli.read" in modules
    assert "mqtt_backup.cli.maintenance" not in modules
    assert "mqtt_backup.web" not in modules


# Runs `mqtt-backup run` in this process; at exit, writes the modules it had loaded.
_RUN_AND_LIST = """
import atexit, json, sys
listed = sys.argv[1]
atexit.register(lambda: open(listed, "w").write(json.dumps(sorted(sys.modules))))
from mqtt_backup.cli import main
sys.argv = ["mqtt-backup", *sys.argv[2:]]
main()
"""


def test_a_running_bridge_loads_neither_paho_nor_aiomqtt(
    broker: Broker, data_dir: Path, unique: str, tmp_path: Path
) -> None:
    listed, log = tmp_path / "modules.json", tmp_path / "bridge.log"
    argv = ["run", "--broker", broker.url, "--data", str(data_dir), "--partitions", "3"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _RUN_AND_LIST, str(listed), *argv],
            stdout=out,
            stderr=out,
            cwd=REPO,
        )
    try:
        wait_until(lambda: proc.poll() is None and "running" in log.read_text(), 20, "the bridge")
        # Stored, restore service and control socket up: every part of a run has been loaded.
        asyncio.run(publish_async(broker, [Sent(f"devices/{unique}/t", b"1")]))
        wait_until(lambda: stored_count(data_dir) >= 1, 20, "the message stored")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    modules = set(json.loads(listed.read_text()))
    assert "mqtt_backup.bridge" in modules
    assert "mqtt_backup.restore.service" in modules
    assert _heavy(modules) == []
    assert sorted(m for m in modules if m.split(".")[0] in MQTT_CLIENTS) == []
