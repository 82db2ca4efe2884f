"""`verify` and `stats` live in `storage.checks`; this module keeps the old name for importers."""

from mqtt_backup.storage.checks import (
    PROGRESS_EVERY,
    PartitionStats,
    Problem,
    StatsReport,
    Usage,
    VerifyReport,
    stats,
    verify,
)

__all__ = [
    "PROGRESS_EVERY",
    "PartitionStats",
    "Problem",
    "StatsReport",
    "Usage",
    "VerifyReport",
    "stats",
    "verify",
]
