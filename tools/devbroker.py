"""Render and start a local Mosquitto from the project's own `mosquitto/*.conf`.

Used by `make run` (see tools/run-dev.sh) and by the test fixtures, so both run the broker the
README describes: only the port, the persistence directory and the user are filled in.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "mosquitto"
INSTALL_HINT = "apt-get install -y mosquitto mosquitto-clients"


class BrokerStartError(RuntimeError):
    """Mosquitto could not be started; the message says why."""


class PortTaken(BrokerStartError):
    """Another process listens on the port (it took it between `free_port` and our bind)."""


_FILE_OPTION = re.compile(r"(?m)^(password_file|acl_file|cafile|certfile|keyfile)\s+(\S+)\s*$")


def render_config(
    template: Path,
    port: int,
    state_dir: Path | str,
    *,
    bind: str = "127.0.0.1",
    as_user: bool = True,
    overlays: Sequence[Path] = (),
    relocate_files: bool = False,
) -> str:
    """Return the template with its listener, persistence directory and user filled in.

    Overlays (e.g. mosquitto/tls.conf) are appended; Mosquitto lets a later line win. Their
    relative file names (password_file, cafile, ...) are resolved against the state directory.
    Started as root, Mosquitto drops to the `mosquitto` user, which often cannot write the
    persistence directory (persistence then fails silently). Running as the current user avoids it.
    `relocate_files` moves the template's own files (production.conf's /etc/mosquitto/passwd, ...)
    into the state directory, under their base names, so tests run that file unchanged otherwise.
    """
    where = state_dir.resolve() if isinstance(state_dir, Path) else state_dir
    text = template.read_text(encoding="utf-8")
    if relocate_files:
        text = _FILE_OPTION.sub(lambda m: f"{m[1]} {where}/{Path(m[2]).name}", text)
    for overlay in overlays:
        extra = _FILE_OPTION.sub(
            lambda m: f"{m[1]} {m[2] if m[2].startswith('/') else f'{where}/{m[2]}'}",
            overlay.read_text(encoding="utf-8"),
        )
        text += f"\n# ---- overlay {overlay.name} ----\n{extra}"
    text, listeners = re.subn(r"(?m)^listener\s+\d+.*$", f"listener {port} {bind}", text)
    if listeners != 1:
        raise BrokerStartError(f"{template} must have exactly one 'listener PORT' line")
    text = re.sub(r"(?m)^persistence_location\s+.*$", f"persistence_location {where}/", text)
    if as_user and os.geteuid() == 0:
        text += (
            "\n# Filled in: stay the current user so the persistence directory stays writable.\n"
        )
        text += f"user {getpass.getuser()}\n"
    return text


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` itself listens on TCP `port` (not merely: something does).

    Reads Linux's /proc: the listening sockets of /proc/net/tcp, matched to the process's file
    descriptors by inode. Elsewhere any listener on 127.0.0.1 counts.
    """
    table = Path("/proc/net/tcp")
    if not table.exists():
        return port_open(port)
    try:
        sockets = {str(fd.readlink()) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:  # gone, or a descriptor closed while we looked
        return False
    for line in table.read_text(encoding="ascii").splitlines()[1:]:
        fields = line.split()  # sl local_address rem_address st ... inode
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
            return f"socket:[{inode}]" in sockets
    return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def mosquitto_binary() -> str:
    """Path of the mosquitto binary, or an error naming the package to install."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BrokerStartError(f"mosquitto is not installed. Try: {INSTALL_HINT}")
    return found


def start(
    conf_name: str,
    port: int,
    state_dir: Path,
    log_path: Path | None = None,
    overlays: Sequence[str] = (),
    *,
    relocate_files: bool = False,
) -> subprocess.Popen[bytes]:
    """Start mosquitto with a config rendered from `mosquitto/<conf_name>`; wait for its port.

    PortTaken when another process listens there: a caller that chose the port with `free_port`
    may choose again (another pytest-xdist worker can take it before mosquitto binds).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    conf_path = state_dir / "mosquitto.conf"
    rendered = render_config(
        CONF_DIR / conf_name,
        port,
        state_dir,
        overlays=[CONF_DIR / o for o in overlays],
        relocate_files=relocate_files,
    )
    conf_path.write_text(rendered, encoding="utf-8")
    log = (log_path or state_dir / "mosquitto.log").open("ab")
    said_from = log.tell()  # the log is kept across restarts: what this start says comes after
    proc = subprocess.Popen(
        [mosquitto_binary(), "-c", str(conf_path)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 10
    while not listens(proc.pid, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            if b"Address already in use" in Path(log.name).read_bytes()[said_from:]:
                raise PortTaken(f"port {port} is taken by another process; see {log.name}")
            raise BrokerStartError(f"mosquitto did not start on port {port}; see {log.name}")
        time.sleep(0.02)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop mosquitto the way an operator would (SIGTERM saves its persistence file)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    """`python -m tools.devbroker render ...`: print a rendered config (run-dev.sh)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["render"])
    parser.add_argument("--conf", default="dev.conf")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--state-dir", type=Path, default=Path(".run/mosquitto"))
    args = parser.parse_args()
    args.state_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout.write(render_config(CONF_DIR / args.conf, args.port, args.state_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
