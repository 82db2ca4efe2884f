"""The machine a run happened on: cores, memory, CPU model, OS, load, and the versions involved."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from tools import devbroker

PACKAGES = ("mqtt-backup", "paho-mqtt", "aiomqtt", "mqtt5", "rocksdict", "mmh3")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _mosquitto_version() -> str:
    try:
        out = subprocess.run(
            [devbroker.mosquitto_binary(), "-h"], capture_output=True, check=False, timeout=10
        )
    except (OSError, devbroker.BrokerStartError, subprocess.TimeoutExpired):
        return "unknown"
    first = (out.stdout or out.stderr).decode(errors="replace").splitlines()
    return first[0].replace("mosquitto version", "").strip() if first else "unknown"


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages."""
    return os.getloadavg()


def commit() -> str | None:
    """The commit measured (with `+` when the tree has changes); None outside a git checkout."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+" if dirty else "")


def _git(*args: str) -> str:
    here = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["git", "-C", str(here), *args], capture_output=True, text=True, check=True, timeout=10
    )
    return done.stdout.strip()


def describe() -> dict[str, Any]:
    """Everything the report says about the machine."""
    return {
        "cores": os.cpu_count() or 0,
        "memory_bytes": _memory_bytes(),
        "cpu_model": _cpu_model(),
        "os": _os_name(),
        "kernel": platform.release(),
        "mosquitto": _mosquitto_version(),
        "python": platform.python_version(),
        "packages": _versions(),
    }
