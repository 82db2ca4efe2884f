"""What the pages show, read from a StoreReader with bounded work (no web framework here).

A device may hold millions of messages; decoding them all for one page would take seconds. So
a plot reads a bounded sample: the window is cut into buckets, each bucket into a few spans, and
each span is one key seek followed by at most `cap` records. A span whose records end before
the cap is counted exactly; a fuller one is estimated from how long the cap took to fill. The
work per page is at most `READ_BUDGET` records, whatever the device's size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from itertools import islice, pairwise
from typing import Any

from mqtt_backup.storage import DeviceInfo, StoredMessage, StoreReader
from mqtt_backup.storage.journal import Gap
from mqtt_backup.times import format_ts

NS_PER_S = 1_000_000_000
NS_PER_MIN = 60 * NS_PER_S
# Records read for one device page's plots (the sample plus one look-ahead per span).
READ_BUDGET = 8192
SPANS_PER_BUCKET = 4
DEFAULT_BUCKETS = 120
MAX_BUCKETS = 400
# Plots per device page; fields past this are listed as left out.
MAX_FIELDS = 16
# Nesting levels of a JSON payload searched for numbers.
MAX_DEPTH = 4
# A sparkline: this many buckets over the last day of the store's history.
SPARK_BUCKETS = 24
SPARK_CAP = 8
SPARK_WINDOW_NS = 24 * 3600 * NS_PER_S
# A device is silent when quiet for more than this many usual intervals (and a minute).
SILENT_INTERVALS = 3
SILENT_MIN_NS = 60 * NS_PER_S


# ---- one span: a seek and a bounded read ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpanRead:
    """The first records of [since, until) and that span's message count."""

    sample: list[StoredMessage]
    count: float
    exact: bool


def read_span(reader: StoreReader, device: str, since: int, until: int, cap: int) -> SpanRead:
    """At most `cap` records from the start of the span, plus one to know whether more follow."""
    got = take(reader.messages(device, since, until), cap + 1)
    if len(got) <= cap:
        return SpanRead(got, len(got), exact=True)
    # `cap` intervals between the first and the look-ahead record: assume that rate throughout.
    took = max(got[cap].ts_ns - got[0].ts_ns, 1)
    return SpanRead(got[:cap], cap * (until - since) / took, exact=False)


def take(found: Iterator[StoredMessage], n: int) -> list[StoredMessage]:
    """The first `n`, then the scan closed: an open one holds a RocksDB iterator until freed."""
    try:
        return list(islice(found, n))
    finally:
        if isinstance(found, Generator):
            found.close()


def _edges(since: int, until: int, parts: int) -> list[int]:
    return [since + (until - since) * i // parts for i in range(parts + 1)]


# ---- numbers in payloads -----------------------------------------------------------------------


def numeric_fields(topic: str, payload: bytes) -> dict[str, float]:
    """Every number in a JSON payload by its dotted path (`env.temp_c`, `cells.0`).

    A payload that is a bare JSON number is named by its topic (`tele/x/temp` carrying `21.5`).
    Booleans are not numbers here; neither are NaN or infinities.
    """
    head = payload.lstrip()[:1]
    if not head or head not in b"{[-0123456789":
        return {}
    try:
        doc = json.loads(payload)
    except ValueError:  # also UnicodeDecodeError
        return {}
    out: dict[str, float] = {}
    if isinstance(doc, dict | list):
        _walk(doc, "", out, 0)
    elif _is_number(doc):
        out[topic] = float(doc)
    return out


def _walk(node: Any, path: str, out: dict[str, float], depth: int) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        name = f"{path}.{key}" if path else str(key)
        if _is_number(value):
            out[name] = float(value)
        elif isinstance(value, dict | list) and depth < MAX_DEPTH:
            _walk(value, name, out, depth + 1)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ---- a device's plots --------------------------------------------------------------------------


@dataclass(slots=True)
class _Field:
    low: list[float | None]
    high: list[float | None]
    total: list[float]
    n: list[int]

    @classmethod
    def empty(cls, buckets: int) -> _Field:
        return cls([None] * buckets, [None] * buckets, [0.0] * buckets, [0] * buckets)

    def add(self, bucket: int, value: float) -> None:
        low, high = self.low[bucket], self.high[bucket]
        self.low[bucket] = value if low is None else min(low, value)
        self.high[bucket] = value if high is None else max(high, value)
        self.total[bucket] += value
        self.n[bucket] += 1

    def as_json(self) -> dict[str, list[float | None]]:
        mean = [t / n if n else None for t, n in zip(self.total, self.n, strict=True)]
        return {"min": self.low, "max": self.high, "mean": mean}


@dataclass(slots=True)
class Series:
    """A device's window cut into buckets: message rate and min/max/mean per numeric field."""

    since: int
    until: int
    starts: list[int]
    per_minute: list[float]
    exact: list[bool]
    fields: dict[str, _Field] = field(default_factory=dict)
    left_out: set[str] = field(default_factory=set)
    reads: int = 0

    def add(self, bucket: int, msg: StoredMessage) -> None:
        for name, value in numeric_fields(msg.record.topic, msg.record.payload).items():
            found = self.fields.get(name)
            if found is None:
                if len(self.fields) >= MAX_FIELDS:
                    self.left_out.add(name)
                    continue
                found = self.fields[name] = _Field.empty(len(self.starts))
            found.add(bucket, value)

    def as_json(self, gaps: list[Gap]) -> dict[str, Any]:
        """The plots' data: bucket starts in epoch seconds (uPlot's x), one list per series."""
        width = (self.until - self.since) / max(len(self.starts), 1)
        return {
            "since": format_ts(self.since),
            "until": format_ts(self.until),
            "bucket_seconds": width / NS_PER_S,
            "t": [s / NS_PER_S for s in self.starts],
            "per_minute": self.per_minute,
            "exact": self.exact,
            "fields": {name: f.as_json() for name, f in sorted(self.fields.items())},
            "fields_left_out": sorted(self.left_out),
            "records_read": self.reads,
            "gaps": [
                {**g.as_json(), "since_s": g.since_ns / NS_PER_S, "until_s": g.until_ns / NS_PER_S}
                for g in gaps
            ],
        }


def bucket_count(since: int, until: int, wanted: int) -> int:
    """Buckets for a window: as asked, within [1, MAX_BUCKETS], never narrower than 1 ns."""
    return max(1, min(wanted, MAX_BUCKETS, until - since))


def device_series(
    reader: StoreReader, device: str, since: int, until: int, buckets: int = DEFAULT_BUCKETS
) -> Series:
    """Rate and numeric fields of [since, until), reading at most READ_BUDGET records."""
    buckets = bucket_count(since, until, buckets)
    edges = _edges(since, until, buckets)
    cap = max(1, READ_BUDGET // (buckets * SPANS_PER_BUCKET) - 1)
    series = Series(since, until, edges[:-1], [0.0] * buckets, [True] * buckets)
    for b in range(buckets):
        count = 0.0
        for lo, hi in pairwise(_edges(edges[b], edges[b + 1], SPANS_PER_BUCKET)):
            if lo >= hi:
                continue
            span = read_span(reader, device, lo, hi, cap)
            series.reads += len(span.sample) + (0 if span.exact else 1)
            count += span.count
            series.exact[b] = series.exact[b] and span.exact
            for msg in span.sample:
                series.add(b, msg)
        series.per_minute[b] = count * NS_PER_MIN / max(edges[b + 1] - edges[b], 1)
    return series


# ---- the device list ---------------------------------------------------------------------------


def usual_interval_ns(d: DeviceInfo) -> int | None:
    """The device's mean time between messages over its history; None below two messages."""
    if d.count < 2 or d.last_ns <= d.first_ns:
        return None
    return (d.last_ns - d.first_ns) // (d.count - 1)


def silent_for(d: DeviceInfo, now_ns: int) -> int | None:
    """How long the device has been quiet, when that is longer than it usually is."""
    interval = usual_interval_ns(d)
    quiet = now_ns - d.last_ns
    if interval is None or quiet <= max(SILENT_INTERVALS * interval, SILENT_MIN_NS):
        return None
    return quiet


def sparkline(reader: StoreReader, device: str, end_ns: int) -> list[float]:
    """Messages per minute in SPARK_BUCKETS buckets of the day before `end_ns` (bounded)."""
    since = max(end_ns - SPARK_WINDOW_NS, 0)
    edges = _edges(since, end_ns, SPARK_BUCKETS)
    return [
        read_span(reader, device, lo, hi, SPARK_CAP).count * NS_PER_MIN / max(hi - lo, 1)
        for lo, hi in pairwise(edges)
    ]


def spark_points(values: list[float], width: int = 96, height: int = 20) -> str:
    """An SVG polyline's points for a sparkline (y grows downwards; max at the top)."""
    top = max(values, default=0.0) or 1.0
    step = width / max(len(values) - 1, 1)
    return " ".join(
        f"{i * step:.1f},{height - 1 - (v / top) * (height - 2):.1f}" for i, v in enumerate(values)
    )
