"""`pip install .` (or `pipx install .`) gives a working `mqtt-backup`.

The editable install the tests run on hides what a wheel leaves out: templates, static files, the
console script. So the wheel is built and installed into a fresh venv, without the project on the
path; its dependencies come from this venv's site-packages through a `.pth` line (installing them
again from the package index would only test pip).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import mqtt_backup
from tests.conftest import REPO

# One worker builds the wheel (pytest-xdist, --dist loadgroup): setuptools builds in the source
# tree (build/, *.egg-info), and two builds there at once would race.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("install")]

LIST_WEB_FILES = """
from importlib.resources import files
web = files("mqtt_backup.web")
for path in sorted(str(p.relative_to(web)) for p in web.rglob("*") if p.is_file()):
    if "__pycache__" not in path:
        print(path)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the wheel of this checkout installed; returns its bin directory."""
    work = tmp_path_factory.mktemp("install")
    wheels = work / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
        check=True,
        cwd=work,
    )
    (wheel,) = wheels.glob("mqtt_backup-*.whl")
    venv = work / "venv"
    # Without pip of its own (ensurepip is most of a venv's making): this venv's pip installs
    # into it (`--python`).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
    subprocess.run([*pip, "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    site = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # After the venv's own site-packages: the wheel's copy of mqtt_backup wins over the editable one
    # (whose finder is a .pth of that directory, which Python does not run for a path added here).
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_the_console_script_runs_from_the_wheel(installed: Path) -> None:
    result = subprocess.run(
        [str(installed / "mqtt-backup"), "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith(f"mqtt-backup {mqtt_backup.__version__} (python ")


def test_the_wheel_is_what_runs_not_the_checkout(installed: Path) -> None:
    where = subprocess.run(
        [str(installed / "python"), "-c", "import mqtt_backup; print(mqtt_backup.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout.strip()
    assert Path(where).is_relative_to(installed.parent), where


def test_the_wheel_carries_the_web_views_files(installed: Path) -> None:
    listing = subprocess.run(
        [
            str(installed / "python"),
            "-c",
            LIST_WEB_FILES,
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout.split()
    source = REPO / "mqtt_backup" / "web"
    expected = sorted(
        str(p.relative_to(source))
        for p in source.rglob("*")
        if p.is_file() and p.suffix != ".pyc" and "__pycache__" not in p.parts
    )
    assert listing == expected


def test_the_commands_start_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    # An import that only works from the checkout shows here as a traceback or exit 1. Every
    # command module is imported to build the group; `web` imports its room when it runs.
    result = subprocess.run(
        [str(installed / "mqtt-backup"), "run", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    missing = subprocess.run(
        [str(installed / "mqtt-backup"), "web", "--data", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert missing.returncode == 4, missing.stderr
    assert "Traceback" not in missing.stderr
