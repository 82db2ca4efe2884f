"""The store as the web view reads it: one reader that follows a running bridge.

The reader is a RocksDB secondary instance (as the restore service uses): it opens once and
catches up with the writer's WAL in milliseconds, so a page shows what the bridge stored a
second ago without reopening every partition per request. Its scratch directory is a private
temporary directory, not in the data directory: the web view writes nothing there.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mqtt_backup.storage import StoreReader

# Pages catch up with the writer at most this often (seconds).
REFRESH_S = 1.0


class Source:
    """A secondary StoreReader behind a lock; `reading()` hands it out caught up."""

    def __init__(self, data_dir: Path, refresh_s: float = REFRESH_S) -> None:
        self.data_dir = data_dir
        self._refresh_s = refresh_s
        self._scratch = Path(tempfile.mkdtemp(prefix="mqtt-backup-web-"))
        try:
            self._reader = StoreReader(data_dir, secondary=self._scratch)
        except BaseException:
            shutil.rmtree(self._scratch, ignore_errors=True)
            raise
        self._lock = threading.Lock()
        self._fresh_at = time.monotonic()

    @contextmanager
    def reading(self) -> Iterator[StoreReader]:
        """The reader, caught up with the writer if it last did so over REFRESH_S ago.

        Requests take turns: a refresh may reopen partitions (a partition added or removed),
        which must not happen under another request's scan. Each page's work is bounded.
        """
        with self._lock:
            now = time.monotonic()
            if now - self._fresh_at >= self._refresh_s:
                self._reader.refresh()
                self._fresh_at = now
            yield self._reader

    def close(self) -> None:
        """Close the reader and remove its scratch directory."""
        with self._lock:
            self._reader.close()
            shutil.rmtree(self._scratch, ignore_errors=True)
