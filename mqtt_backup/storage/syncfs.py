"""One `syncfs(2)` per filesystem: the durable point of an ingest commit over several partitions.

A synced RocksDB write fsyncs its partition's WAL; a commit touching 4 partitions paid 4 fsyncs
one after the other (ext4 serialises them: threads measured no gain). Instead each partition's
write goes to the OS unsynced (RocksDB hands a WAL record to `write(2)` at every write unless
`manual_wal_flush` is set, which it is not here) and one `syncfs` per filesystem then makes all of
them durable, with one journal commit.

Errors: since Linux 5.8 `syncfs` reports a writeback error of its filesystem that happened since
the descriptor it is called on was opened (or since its last report), so each descriptor is opened
before the first unsynced write to that filesystem and kept for the store's life. A failure is a
storage failure (nothing of the commit counts as stored). Python has no `os.syncfs`: libc's, by
ctypes; where there is none (not Linux), `available()` is False and the caller syncs each WAL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from mqtt_backup.errors import StorageUnavailable


def _libc_syncfs() -> ctypes._NamedFuncPointer | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    return func


# ctypes releases the GIL around the call: the ingest loop reads on while it waits.
_SYNCFS = _libc_syncfs()


def available() -> bool:
    """Whether this system has syncfs(2)."""
    return _SYNCFS is not None


def syncfs(fd: int) -> None:
    """Write back and commit the whole filesystem of `fd`; OSError when it reports an error."""
    if _SYNCFS is None:
        raise OSError(38, "syncfs is not available")
    if _SYNCFS(fd) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


class FsSync:
    """A descriptor per filesystem (by `st_dev`), held open so that `syncfs` reports its errors."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def watch(self, device: int, path: Path) -> None:
        """Hold a descriptor on `path`'s filesystem (`device`): before the first unsynced write."""
        with self._lock:
            if device not in self._fds:
                self._fds[device] = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def sync(self, devices: Iterable[int], what: str) -> None:
        """One syncfs per filesystem in `devices` (each `watch`ed); StorageUnavailable on error."""
        for device in sorted(set(devices)):
            try:
                syncfs(self._fds[device])
            except OSError as exc:
                raise StorageUnavailable(f"sync of {what} failed: {exc}") from exc

    def close(self) -> None:
        """Close every descriptor."""
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
