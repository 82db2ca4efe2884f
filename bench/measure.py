"""Pure arithmetic on what the meters saw: drain rates from $SYS samples, percentiles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Drain:
    """A queue drained from `full` to `base` messages between two (interpolated) times."""

    start: float
    end: float
    messages: int
    method: str  # "broker-fit", "consumer-events" or "broker-bounds" (see drain())

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.messages / max(self.end - self.start, 1e-9)


def drain(
    samples: Sequence[tuple[float, int]],
    since: float,
    full: int,
    base: int,
    events: tuple[float, float] | None = None,
) -> Drain:
    """When a queue of full - base messages started and stopped draining.

    The broker publishes its store count every second or two. Samples strictly inside the drain
    lie on a line (the drain rate is steady); extending that line to `full` and `base` gives
    start and end to well under a second. A drain too short for three samples inside is timed by
    the consumer's own events instead, taken where they cost it nothing (`events`: mosquitto_sub's
    start and exit, the first and last growth of the bridge's WAL files); without them, the last
    sample still full and the first one at base bound it from outside.
    """
    after = [(t, v) for t, v in samples if t >= since]
    inside = [(t, v) for t, v in after if base < v < full]
    messages = full - base
    if len(inside) >= 3:
        slope, icept = _line(inside)
        if slope < 0:
            return Drain((full - icept) / slope, (base - icept) / slope, messages, "broker-fit")
    if events is not None and events[1] > events[0]:
        return Drain(events[0], events[1], messages, "consumer-events")
    last_full = max((t for t, v in after if v >= full), default=since)
    first_base = min((t for t, v in after if v <= base), default=after[-1][0] if after else since)
    return Drain(last_full, max(first_base, last_full), messages, "broker-bounds")


def _line(points: Sequence[tuple[float, int]]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    slope = sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0
    return slope, mv - slope * mt


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[rank]


def first_reaching(scrapes: Sequence[tuple[float, int]], counts: Sequence[int]) -> list[float]:
    """For each count (ascending), the time of the first scrape that had at least that many."""
    out: list[float] = []
    j = 0
    for count in counts:
        while j < len(scrapes) and scrapes[j][1] < count:
            j += 1
        out.append(scrapes[j][0] if j < len(scrapes) else float("nan"))
    return out
