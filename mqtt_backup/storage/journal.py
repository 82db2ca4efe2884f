"""The gap log and the bridge's small state file, both in the data directory.

- `gaps.jsonl`: spans in which the bridge may have missed messages (a JSON object a line, fsynced),
  so a restore never claims a history it does not have.
- `state.json`: when the bridge was last alive and what it had subscribed to, rewritten atomically
  every few seconds and at shutdown.
- `broker-dropped.json`: the last reading of the broker's dropped-message counter and until when
  it was known to hold, so that a rise while the bridge was away becomes a gap at the next start.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqtt_backup.errors import CorruptRecord, StorageError
from mqtt_backup.storage.files import append_line_synced, fsync_dir, write_json_atomic
from mqtt_backup.times import format_ts

GAPS = "gaps.jsonl"
STATE = "state.json"
DROPPED = "broker-dropped.json"
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
    """Append-only, fsynced list of gaps (or, under another name, of other spans)."""

    def __init__(self, data_dir: Path, name: str = GAPS) -> None:
        self.path = data_dir / name

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
        # OverflowError: a time of 1e400 (infinity); RecursionError: JSON nested too deep.
        except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):
            return cls()

    def save(self, data_dir: Path) -> None:
        """Rewrite the state file atomically."""
        write_json_atomic(
            data_dir / STATE,
            {"last_alive_ns": self.last_alive_ns, "subscriptions": self.subscriptions},
        )


@dataclass(frozen=True, slots=True)
class DroppedReading:
    """The broker's `$SYS/broker/publish/messages/dropped` as last read, and until when it held.

    `broker` names the broker it was read from (a reading of another broker is no baseline);
    `dropped` is None when the value is not known but did not change since `seen_ns`;
    `broker_started_ns` is the broker's start estimated from `$SYS/broker/uptime` (None when
    unknown), so that a broker restart, which resets the counter, is recognised.
    """

    broker: str
    dropped: int | None
    seen_ns: int
    broker_started_ns: int | None = None

    @classmethod
    def load(cls, data_dir: Path) -> DroppedReading | None:
        """The saved reading; None when there is none or it does not parse (a fresh baseline)."""
        try:
            raw = json.loads((data_dir / DROPPED).read_text(encoding="utf-8"))
            started, dropped = raw.get("broker_started_ns"), raw["dropped"]
            return cls(
                str(raw["broker"]),
                None if dropped is None else int(dropped),
                int(raw["seen_ns"]),
                None if started is None else int(started),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self, data_dir: Path) -> None:
        """Rewrite the file atomically, readable by the owner only; StorageError when it fails."""
        _write_private_json(
            data_dir / DROPPED,
            {
                "broker": self.broker,
                "dropped": self.dropped,
                "seen_ns": self.seen_ns,
                "broker_started_ns": self.broker_started_ns,
            },
        )


def _write_private_json(path: Path, data: Any) -> None:
    # As write_json_atomic, but born 0600 whatever the umask: the file names the broker.
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)  # an old .tmp keeps its mode through O_CREAT
            json.dump(data, out, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
