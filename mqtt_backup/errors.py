"""Error classes: each carries its exit code; its docstring is the user-facing message.

Only the CLI (`cli/main.py`) turns them into output. A message says what is wrong and, after
"Try:", what to do.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_BROKER = 3
EXIT_STORAGE = 4


class BackupError(Exception):
    """{detail}"""

    exit_code: ClassVar[int] = EXIT_RUNTIME

    def __init__(self, detail: str = "", hint: str = "") -> None:
        self.detail = detail
        self.hint = hint
        super().__init__(self.message())

    def message(self) -> str:
        """The one line the user sees."""
        template = (type(self).__doc__ or "{detail}").strip().splitlines()[0]
        text = template.format(detail=self.detail)
        # One line, whatever a library put in the detail (RocksDB's texts span several).
        return _one_line(f"{text.rstrip('.')}. Try: {self.hint}" if self.hint else text)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class UsageError(BackupError):
    """{detail}"""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """bad configuration: {detail}"""


class BrokerError(BackupError):
    """broker problem: {detail}"""

    exit_code = EXIT_BROKER


class BrokerUnreachable(BrokerError):
    """cannot reach the broker: {detail}"""


class BrokerRefused(BrokerError):
    """the broker refused the bridge: {detail}"""


class RestoreClientRefused(BrokerRefused):
    """the broker refused the restore client: {detail}"""


class StatusClientRefused(BrokerRefused):
    """the broker refused the status client: {detail}"""


class SessionTakenOver(BrokerError):
    """another connection took the bridge's broker session: {detail}"""


class ClientIdInUse(BrokerError):
    """another bridge uses this client id: {detail}"""


class StorageError(BackupError):
    """storage problem: {detail}"""

    exit_code = EXIT_STORAGE


class DataDirLocked(StorageError):
    """data directory is in use: {detail}"""


class OperationStopped(BackupError):
    """the bridge is stopping: the {detail} stopped between two steps (nothing is half-done)"""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail, "run the command again (on the bridge or offline) to finish it")


class NoReply(BackupError):
    """the bridge went away before it answered: {detail}"""


class DataDirMissing(StorageError):
    """no data directory: {detail}"""


class ForeignDataDir(StorageError):
    """not an mqtt-backup data directory: {detail}"""


class CorruptRecord(StorageError):
    """corrupt record: {detail}"""


class BadManifest(CorruptRecord):
    """damaged manifest: {detail}"""


class NewerFormat(StorageError):
    """written by a newer mqtt-backup: {detail}"""


class StorageUnavailable(StorageError):
    """cannot write to storage: {detail}"""
