"""Small durable-file helpers: atomic replace, fsynced append, the data directory lock, privacy."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqtt_backup.errors import DataDirLocked, StorageError


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file, fsync it, rename it over `path`, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            json.dump(data, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def append_line_synced(path: Path, line: str) -> None:
    """Append one line and fsync, so the line survives a crash right after."""
    try:
        with path.open("ab+") as out:
            # A crash mid-append leaves a line without its newline: end it before adding ours.
            torn = out.seek(0, os.SEEK_END) > 0 and out.seek(-1, os.SEEK_END) >= 0
            if torn and out.read(1) != b"\n":
                out.write(b"\n")
            out.write(line.encode("utf-8") + b"\n")
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise StorageError(f"cannot append to {path}: {exc.strerror or exc}") from exc


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirLock:
    """An exclusive flock on `<data>/LOCK`: one writer per data directory, released on exit."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "LOCK"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise DataDirLocked naming the process that holds it."""
        for _ in range(10):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(fd)
                os.close(fd)
                raise DataDirLocked(
                    f"{self.path.parent} is held by {holder}",
                    "stop the other bridge, or give this one its own --data directory",
                ) from None
            if _still_at(fd, self.path):
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._fd = fd
                return
            # Deleted or replaced between our open and our flock: a lock on a file nobody else
            # will open again would let a second writer in. Lock the file that is there now.
            os.close(fd)
        raise DataDirLocked(f"{self.path} keeps being replaced", "check what else writes there")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open {self.path}: {exc.strerror or exc}") from exc

    def release(self) -> None:
        """Let go of the lock (closing the descriptor drops the flock)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _still_at(fd: int, path: Path) -> bool:
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def lock_holder(fd: int) -> str:
    """'pid N' of the live process holding the flock on `fd`'s file, or 'another process'.

    The kernel's lock table names the holder; the pid written into the file is only the last
    writer's, which may have exited since (or never written, for another program).
    """
    info = os.fstat(fd)
    try:
        table = Path("/proc/locks").read_text(encoding="ascii", errors="replace")
    except OSError:
        return "another process"
    for line in table.splitlines():
        fields = line.split()
        if "FLOCK" not in fields or "->" in fields:  # "->" marks a waiter, not the holder
            continue
        at = fields.index("FLOCK") + 3  # FLOCK ADVISORY WRITE <pid> <major:minor:inode>
        if at + 1 < len(fields) and _same_inode(fields[at + 1], info):
            pid = int(fields[at]) if fields[at].isdigit() else 0
            return f"pid {pid}" if pid > 0 else "another process"
    return "another process"


def _same_inode(text: str, info: os.stat_result) -> bool:
    try:
        major, minor, inode = text.split(":")
        where = (int(major, 16), int(minor, 16), int(inode))
    except ValueError:
        return False
    return where == (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)


# Stored payloads are private: while a store is open, what this process creates (RocksDB's own
# files included, which no option of ours reaches) is born 0600, its directories 0700.
PRIVATE_UMASK = 0o077


class _PrivateUmask:
    """The process umask held at PRIVATE_UMASK while any store is open, then given back.

    No bytecode is written meanwhile: a module imported then (`run` imports the bridge while
    the store opens) would leave owner-only `__pycache__` files in an installed package.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._saved = 0
        self._saved_bytecode = False

    def hold(self) -> None:
        with self._lock:
            if self._holders == 0:  # bytecode off before the umask tightens, back after
                self._saved_bytecode = sys.dont_write_bytecode
                sys.dont_write_bytecode = True
                self._saved = os.umask(PRIVATE_UMASK)
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                os.umask(self._saved)
                sys.dont_write_bytecode = self._saved_bytecode


PRIVATE_UMASK_HOLD = _PrivateUmask()


@dataclass(slots=True)
class Privacy:
    """What `make_private` did: how many entries it tightened, which it could not."""

    tightened: int = 0
    refused: list[tuple[Path, int]] = field(default_factory=list)  # (path, owner uid)


def make_private(roots: Iterable[Path]) -> Privacy:
    """Take group and other permissions off everything below `roots` (symlinks not followed)."""
    done = Privacy()
    for root in roots:
        for top, _dirs, files in os.walk(root):
            for path in (Path(top), *(Path(top) / name for name in files)):
                _make_private(path, done)
    return done


def _make_private(path: Path, done: Privacy) -> None:
    try:
        info = path.lstat()
    except OSError:
        return  # RocksDB removed an obsolete file meanwhile
    if stat.S_ISLNK(info.st_mode) or not info.st_mode & PRIVATE_UMASK:
        return
    try:
        path.chmod(stat.S_IMODE(info.st_mode) & ~PRIVATE_UMASK)
    except FileNotFoundError:
        return
    except PermissionError:
        done.refused.append((path, info.st_uid))
    else:
        done.tightened += 1
