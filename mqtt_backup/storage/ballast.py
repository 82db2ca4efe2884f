"""The ballast: space held in reserve in the data directory, so a full disk can still be freed.

On a full disk ingest stalls (the broker keeps the messages), and RocksDB needs room for
anything, even to delete: opening a database writes a new MANIFEST, OPTIONS and info log, and
reclaiming deleted data rewrites table files. The ballast is a file of allocated space made when
the store opens. An operation on a full disk releases it first; it is made again once the disk
has room for it and some more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

BALLAST = "ballast"
MAKING = f".{BALLAST}.making"
MAX_BYTES_FULL = 64 * 1024 * 1024
MAX_BYTES = MAX_BYTES_FULL  # tests reserve less
# Below this much free space the disk counts as full (the same bar a bridge needs to start).
FULL_BELOW_BYTES = 16 * 1024 * 1024


def size_for(data_dir: Path) -> int:
    """The ballast's size: 64 MiB, or an 8th of a smaller filesystem."""
    return min(MAX_BYTES, shutil.disk_usage(data_dir).total // 8)


def wal_bound(path: Path) -> int:
    """How much WAL a partition on this filesystem may hold before RocksDB flushes it.

    Half the ballast's full size: what a flush on a full disk must write then fits in it.
    """
    return min(MAX_BYTES_FULL // 2, shutil.disk_usage(path).total // 16)


def short_of_space(data_dir: Path) -> bool:
    """The disk holding the data directory counts as full."""
    return shutil.disk_usage(data_dir).free < FULL_BELOW_BYTES


def release(data_dir: Path) -> int:
    """Delete the ballast; bytes given back (0 when there was none)."""
    path = data_dir / BALLAST
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    log.warning(
        "the disk holding %s is full: released the %d MiB ballast so that this operation can "
        "run; it is made again once the disk has room",
        data_dir,
        size // (1024 * 1024),
    )
    return size


def keep(data_dir: Path) -> bool:
    """Make the ballast when it is missing and the disk has room for it; True when it is there.

    Never raises: without room (or on a filesystem that cannot allocate) it waits for a later
    call.
    """
    path = data_dir / BALLAST
    making = data_dir / MAKING
    try:
        size = size_for(data_dir)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size >= size:
                return True
        if shutil.disk_usage(data_dir).free < size + FULL_BELOW_BYTES:
            return False
        _allocate(making, size)
        making.rename(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            making.unlink(missing_ok=True)
        log.debug("cannot make the ballast in %s: %s", data_dir, exc)
        return False
    return True


def retake(data_dir: Path) -> int:
    """Make the ballast again from the room its release gave, after an operation freed nothing.

    No margin is asked for, unlike `keep`: the room is the reserve itself (ingest was held while
    the operation ran), and without it the next operation on the full disk could not open. It
    takes what is free up to the full size; `keep` makes a whole one later once there is room.
    Returns the bytes it holds (0 when nothing could be taken). Never raises.
    """
    path = data_dir / BALLAST
    making = data_dir / MAKING
    try:
        size = min(size_for(data_dir), shutil.disk_usage(data_dir).free)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size >= size:
                return path.stat().st_size
        if size <= 0:
            return 0
        _allocate(making, size)
        making.rename(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            making.unlink(missing_ok=True)
        log.warning("could not keep the ballast in %s: %s", data_dir, exc)
        return 0
    log.warning(
        "the operation freed nothing: kept %d MiB of the ballast for the next one (the disk is "
        "still full; prune or forget what you can spare, or give the disk more room)",
        size // (1024 * 1024),
    )
    return size


def _allocate(path: Path, size: int) -> None:
    # Allocated, not sparse: a sparse file would reserve nothing. Made aside and renamed, so a
    # crash never leaves a short ballast that looks complete.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)
