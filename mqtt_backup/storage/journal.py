"""The gap log and the bridge's small state file, both in the data directory.

- `gaps.jsonl`: spans in which the bridge may have missed messages (a JSON object a line, fsynced),
  so a restore never claims a history it does not have.
- `state.json`: when the bridge was last alive and what it had subscribed to, rewritten atomically
  every few seconds and at shutdown.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mqtt_backup.errors import CorruptRecord
from mqtt_backup.storage.files import append_line_synced, write_json_atomic
from mqtt_backup.times import format_ts

GAPS = "gaps.jsonl"
STATE = "state.json"
GAP_REASONS = ("session-lost", "downtime", "broker-dropped")
_APPENDING = threading.Lock()


@dataclass(frozen=True, slots=True)
class Gap:
    """A span [since, until) in which messages may be missing, and why."""

    since_ns: int
    until_ns: int
    reason: str

    def overlaps(self, since_ns: int | None, until_ns: int | None) -> bool:
        """Whether the gap touches the window [since, until) (None = open end)."""
        if since_ns is not None and until_ns is not None and since_ns >= until_ns:
            return False  # an empty window misses nothing
        starts_before_end = until_ns is None or self.since_ns < until_ns
        ends_after_start = since_ns is None or self.until_ns > since_ns
        return starts_before_end and ends_after_start

    def as_json(self) -> dict[str, str]:
        """The shape a restore's `done` message carries."""
        return {
            "since": format_ts(self.since_ns),
            "until": format_ts(self.until_ns),
            "reason": self.reason,
        }


class GapLog:
    """Append-only, fsynced list of gaps."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / GAPS

    def record(self, gap: Gap) -> None:
        """Append a gap durably (ingest and the restore service both record gaps)."""
        line = json.dumps(
            {"since_ns": gap.since_ns, "until_ns": gap.until_ns, "reason": gap.reason}
        )
        with _APPENDING:
            append_line_synced(self.path, line)

    def all(self) -> list[Gap]:
        """Every recorded gap, oldest first.

        A torn line (a crash mid-append cut one of our own lines short) is skipped; anything else
        that does not parse is corruption.
        """
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        gaps = []
        for number, line in enumerate(lines, 1):
            try:
                raw = json.loads(line)
                gaps.append(Gap(int(raw["since_ns"]), int(raw["until_ns"]), str(raw["reason"])))
            except (ValueError, KeyError, TypeError):
                if _is_torn(line):
                    continue
                raise CorruptRecord(f"{self.path} line {number} does not parse") from None
        return gaps

    def overlapping(self, since_ns: int | None, until_ns: int | None) -> list[Gap]:
        """Gaps that touch the window [since, until)."""
        return [g for g in self.all() if g.overlaps(since_ns, until_ns)]


def _is_torn(line: str) -> bool:
    # Our lines start with this prefix and end with "}"; a torn one has the first, not the last.
    return line.startswith('{"since_ns": ') and not line.rstrip().endswith("}")


@dataclass(slots=True)
class BridgeState:
    """What a restarted bridge needs to know about its previous run."""

    last_alive_ns: int = 0
    subscriptions: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, data_dir: Path) -> BridgeState:
        """The saved state, or a fresh one for a new data directory (or an unreadable file)."""
        try:
            raw = json.loads((data_dir / STATE).read_text(encoding="utf-8"))
            return cls(int(raw["last_alive_ns"]), [str(s) for s in raw["subscriptions"]])
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def save(self, data_dir: Path) -> None:
        """Rewrite the state file atomically."""
        write_json_atomic(
            data_dir / STATE,
            {"last_alive_ns": self.last_alive_ns, "subscriptions": self.subscriptions},
        )
