"""The local control socket: how CLI commands reach the process that holds a data directory.

`<data>/control.sock`, one JSON line each way: `{"op": "snapshot", "args": {...}}` then
`{"ok": true, "result": {...}}` or `{"ok": false, "error": "...", "exit_code": 4}`. Its only door
is the filesystem: the socket is mode 0600 in the data directory.

`AsyncControlServer` serves it as a task of the bridge's event loop (either ingest transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mqtt_backup.errors import BackupError, DataDirLocked, NoReply, StorageError

SOCKET = "control.sock"
# AF_UNIX paths are limited to 107 bytes; longer ones are reached through the directory's fd.
_MAX_SUN_PATH = 100
_MAX_LINE = 1 << 20
# A bridge binds its socket once connected to the broker, a moment after it took the lock: a
# command in between waits this long for the socket before saying it does not answer.
STARTING_S = 3.0
_RETRY_S = 0.05
Operate = Callable[[str, Mapping[str, Any]], Awaitable[dict[str, Any]]]


class RemoteError(BackupError):
    """{detail}"""

    def __init__(self, detail: str, exit_code: int) -> None:
        super().__init__(detail)
        self.exit_code = exit_code  # type: ignore[misc]


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    if len(str(path)) <= _MAX_SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _parse(line: bytes) -> tuple[str, dict[str, Any]]:
    """(op, args) of a request line; ValueError, KeyError or TypeError when it is not one."""
    request = json.loads(line)
    return str(request["op"]), dict(request.get("args") or {})


def _cannot_bind(path: Path, exc: OSError) -> StorageError:
    """The control socket cannot be made where it belongs (something else is there)."""
    return StorageError(
        f"cannot make the control socket {path}: {exc.strerror or exc}",
        "only the bridge's socket belongs there: remove it and start the bridge again",
    )


def _failed(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, BackupError):
        return {"ok": False, "error": exc.message(), "exit_code": exc.exit_code}
    return {"ok": False, "error": f"bad control request: {exc}", "exit_code": 2}


class AsyncControlServer:
    """Serves the control socket on the running event loop; requests go to `operate`."""

    def __init__(self, data_dir: Path, operate: Operate) -> None:
        self.path = data_dir / SOCKET
        self._operate = operate
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        # Connections still waiting for their request line: closed at `stop` (a client that
        # never sends would otherwise keep its socket open past the bridge's end).
        self._waiting: set[asyncio.StreamWriter] = set()

    def bind(self) -> None:
        """Bind (replacing a stale socket: we hold the data directory's lock), before the loop.

        An error here is a start-up error (StorageError).
        """
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            raise _cannot_bind(self.path, exc) from exc
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _address(self.path) as address:
                # Born private: the open store holds the process umask at 0o077 (no umask change
                # here, which would race the store's worker threads); then owner read/write only.
                sock.bind(address)
            self.path.chmod(0o600)
        except BaseException as exc:
            sock.close()
            self.path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise _cannot_bind(self.path, exc) from exc
            raise
        self._sock = sock

    async def start(self) -> None:
        """Serve on the running loop (after `bind`)."""
        assert self._sock is not None
        self._server = await asyncio.start_unix_server(
            self._serve, sock=self._sock, limit=_MAX_LINE
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self._waiting.add(writer)
            try:
                line = await reader.readline()
            finally:
                self._waiting.discard(writer)
            if not line:
                return  # the client hung up without asking, or the bridge is stopping
            reply = await self._answer(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, ValueError):  # the client went away; or a line over the limit
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            op, args = _parse(line)
            return {"ok": True, "result": await self._operate(op, args)}
        except (BackupError, ValueError, KeyError, TypeError) as exc:
            return _failed(exc)

    def stop(self) -> None:
        """Stop serving and remove the socket; a request under way still gets its reply."""
        for writer in self._waiting:
            writer.close()  # its readline sees the end: nothing to answer
        self._waiting.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        elif self._sock is not None:
            self._sock.close()
        self._sock = None
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def _connected(data_dir: Path) -> Iterator[socket.socket]:
    """A connection to the control socket; a socket not there (yet) is waited for a moment."""
    path = data_dir / SOCKET
    deadline = time.monotonic() + STARTING_S
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, _address(path) as address:
            try:
                sock.connect(address)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() < deadline:  # a bridge starting: not bound or listening yet
                    time.sleep(_RETRY_S)
                    continue
                raise _no_answer(data_dir, exc) from exc
            except OSError as exc:
                raise _no_answer(data_dir, exc) from exc
            yield sock
            return


def _no_answer(data_dir: Path, exc: OSError) -> DataDirLocked:
    return DataDirLocked(
        f"{data_dir} is held by another process and its control socket does not answer "
        f"({exc.strerror or exc})",
        "stop that process, or wait for it to finish",
    )


def call(data_dir: Path, op: str, args: Mapping[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Ask the process holding `data_dir` to run an operation; its errors come back as ours."""
    with _connected(data_dir) as sock:
        sock.settimeout(timeout)
        sock.sendall(json.dumps({"op": op, "args": dict(args)}).encode() + b"\n")
        line = sock.makefile("rb").readline()
    if not line:
        # The bridge stopped (or was killed) while it ran the operation: its outcome is unknown.
        raise NoReply(
            f"whether {op} ran is unknown",
            "start the bridge again (or use the data directory with it stopped) and repeat the "
            "command; prune and forget are safe to repeat",
        )
    reply = json.loads(line)
    if reply.get("ok"):
        result: dict[str, Any] = reply["result"]
        return result
    raise RemoteError(str(reply.get("error", "no answer")), int(reply.get("exit_code", 1)))
