"""`mqtt-backup web`: check the address and the token, open the store, serve with uvicorn.

Safe by default: it listens on 127.0.0.1; any other address needs a token, read from a file
(`--token-file`) or `MQTT_BACKUP_WEB_TOKEN`, never from a flag, which `ps` would show.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from mqtt_backup.errors import UsageError
from mqtt_backup.web.app import create_app

DEFAULT_BIND = "127.0.0.1:8080"
TOKEN_ENV = "MQTT_BACKUP_WEB_TOKEN"  # noqa: S105 (the variable's name, not a secret)
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Bind:
    """Where to listen."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the address."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name may resolve anywhere

    def __str__(self) -> str:
        """host:port, with brackets around an IPv6 address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_bind(text: str) -> Bind:
    """`HOST:PORT` or `[IPv6]:PORT` (UsageError when it is neither)."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(
            f"--bind {text!r} is not HOST:PORT", "--bind 127.0.0.1:8080 or --bind [::1]:8080"
        )
    return Bind(host, int(port))


def load_token(token_file: Path | None, env: Mapping[str, str]) -> str | None:
    """The token from --token-file (first line), else MQTT_BACKUP_WEB_TOKEN, else None."""
    if token_file is not None:
        try:
            lines = token_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(
                f"cannot read --token-file {token_file}: {exc.strerror or exc}"
            ) from exc
        token = lines[0].strip() if lines else ""
        if not token:
            raise UsageError(
                f"--token-file {token_file} is empty", "put the token on its first line"
            )
        return token
    token = env.get(TOKEN_ENV, "").strip()
    return token or None


def check_exposure(bind: Bind, token: str | None) -> None:
    """Refuse to serve beyond this machine without a token."""
    if token is None and not bind.loopback:
        raise UsageError(
            f"--bind {bind} is reachable from other machines and no token is set",
            f"--token-file FILE or {TOKEN_ENV}, or bind to 127.0.0.1",
        )


def listen(bind: Bind) -> socket.socket:
    """A listening socket, so that a taken port is our one-line error, not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(bind.host, bind.port, family, socket.SOCK_STREAM)
        # With its protocol (IPPROTO_TCP): asyncio sets TCP_NODELAY on accepted connections only
        # then; without it every keep-alive response after the first waited ~40 ms for a
        # delayed ACK (found by `make bench`'s web scenario).
        sock = socket.socket(infos[0][0], socket.SOCK_STREAM, infos[0][2])
    except OSError as exc:
        raise UsageError(f"cannot listen on {bind}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(infos[0][4])
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {bind}: {exc.strerror or exc}", "choose another --bind port"
        ) from exc
    return sock


def run_web(
    data: Path,
    bind: str = DEFAULT_BIND,
    token_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    ready: Callable[[str], None] = lambda _url: None,
) -> None:
    """The `web` command: serve the read-only view until interrupted (Ctrl-C, SIGTERM).

    `ready` gets the view's URL once the socket listens (the CLI says where to point a browser).

    Raises UsageError (exit 2) for a bad address, an unreadable token file or a non-loopback
    address without a token; StorageError (exit 4) when the store cannot be read.
    """
    where = parse_bind(bind)
    token = load_token(token_file, os.environ if env is None else env)
    check_exposure(where, token)
    app = create_app(data, token)
    sock = listen(where)
    try:
        log.info("web view of %s on http://%s/", data, where)
        ready(f"http://{dataclasses.replace(where, port=sock.getsockname()[1])}/")  # port 0: chosen
        serve(app, sock)
    finally:
        sock.close()
        app.state.source.close()


def serve(app: object, sock: socket.socket) -> None:
    """Run uvicorn on an already listening socket until a signal stops it."""
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        log_level="warning",
        server_header=False,
        proxy_headers=False,
        access_log=False,
    )
    server = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal that stopped it once its own handlers are gone; with
        # these in place that ends here, and the command exits 0 after a clean stop.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _stopped)
    server.run(sockets=[sock])


def _stopped(signum: int, _frame: FrameType | None) -> None:
    log.info("web view stopped by %s", signal.Signals(signum).name)
