"""The read lease on the writer's database handles.

A restore in the writer's process reads through the writer's own handles (no secondary instance,
no catch-up per request). RocksDB lets those reads run beside writes, but not beside a close: a
rocksdict iterator keeps its database open after `Rdict.close()` (it holds the handle), so a
partition closed under a live scan would still be read after a move switched it out, and could
not be opened again ("lock hold by current process") until the scan ends. So reads hold the lease
shared for one bounded chunk at a time, and whatever closes, opens or replaces handles (a failed
write, a partition move's switch, the shutdown) holds it exclusive: it waits for the chunks in
progress (milliseconds) and the next chunk looks its partition up again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Lease:
    """Shared for reads through the handles, exclusive (re-entrant) for changing them.

    An exclusive request goes first: chunks that would start after it wait, so a stream of
    restores cannot starve a commit's recovery or an operation.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._owner: int | None = None
        self._depth = 0
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the handles open for one chunk of reading."""
        me = threading.get_ident()
        with self._cond:
            counted = self._owner != me  # the exclusive holder reads on its own lease
            if counted:
                while self._owner is not None or self._waiting:
                    self._cond.wait()
                self._readers += 1
        try:
            yield
        finally:
            if counted:
                with self._cond:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Change the handles with no read in progress (re-entrant on the same thread)."""
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:
                self._waiting += 1
                try:
                    while self._owner is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._cond.notify_all()
