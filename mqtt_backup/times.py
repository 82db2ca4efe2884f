"""Timestamps: nanosecond receive times, RFC 3339 rendering and user-given time parsing."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal

from mqtt_backup.errors import UsageError

NS_PER_S = 1_000_000_000
# Keys hold the receive time as 64-bit nanoseconds: the last representable moment is in 2554.
MAX_NS = 2**64 - 1
_EPOCH = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)$")
_RFC3339 = re.compile(
    r"^(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ](?P<time>[0-9]{2}:[0-9]{2}:[0-9]{2})"
    r"(?:\.(?P<frac>[0-9]+))?(?P<tz>[Zz]|[+-][0-9]{2}:[0-9]{2})?$"
)


def format_ts(ts_ns: int) -> str:
    """RFC 3339 UTC with nine fractional digits: 2026-11-24T10:00:00.123456789Z."""
    seconds, nanos = divmod(ts_ns, NS_PER_S)
    whole = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{whole}.{nanos:09d}Z"


def parse_time(value: str | float, what: str = "time") -> int:
    """Nanoseconds since the epoch from RFC 3339 text or epoch seconds (fractions allowed).

    Raises UsageError naming `what` when the value is neither.
    """
    if isinstance(value, bool):
        raise UsageError(f"{what} must be RFC 3339 text or epoch seconds, not {value!r}")
    if isinstance(value, int | float):
        return _from_epoch(float(value) if isinstance(value, float) else value, what)
    text = value.strip()
    if _EPOCH.match(text):
        # Decimal, not float: "1700000000.123456789" keeps every nanosecond digit.
        seconds = Decimal(text)
        if seconds < 0:
            raise UsageError(f"{what} must not be before 1970, got {text!r}")
        return _in_range(int(seconds.scaleb(9).to_integral_value(ROUND_HALF_EVEN)), what)
    return _from_rfc3339(text, what)


def _from_epoch(seconds: float, what: str) -> int:
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise UsageError(f"{what} must be a finite number of seconds, not {seconds!r}")
    if seconds < 0:
        raise UsageError(f"{what} must not be before 1970, got {seconds!r}")
    if isinstance(seconds, int):
        return _in_range(seconds * NS_PER_S, what)
    whole = int(seconds)
    return _in_range(whole * NS_PER_S + round((seconds - whole) * NS_PER_S), what)


def _in_range(ts_ns: int, what: str) -> int:
    if ts_ns > MAX_NS:
        raise UsageError(f"{what} is after {format_ts(MAX_NS)}, the last time the store can hold")
    return ts_ns


def _from_rfc3339(text: str, what: str) -> int:
    match = _RFC3339.match(text)
    if match is None:
        raise UsageError(
            f"{what} {text!r} is neither RFC 3339 (2026-11-24T10:00:00Z) nor epoch seconds"
        )
    if match["tz"] is None:
        raise UsageError(f"{what} {text!r} needs a time zone (e.g. a trailing Z for UTC)")
    tz = "+00:00" if match["tz"] in ("Z", "z") else match["tz"]
    try:
        moment = datetime.fromisoformat(f"{match['date']}T{match['time']}{tz}")
    except ValueError as exc:
        raise UsageError(f"{what} {text!r} is not a valid time: {exc}") from None
    # datetime keeps microseconds only; the nanosecond digits are carried separately.
    nanos = int((match["frac"] or "")[:9].ljust(9, "0"))
    return _in_range(_from_epoch(int(moment.timestamp()), what) + nanos, what)


_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d|w)?$", re.ASCII)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_MAX_DURATION_S = 200 * 365 * 86400  # far past anything useful, well inside 64-bit ns


def parse_duration(text: str, what: str = "duration") -> int:
    """Nanoseconds from '90s', '15m', '12h', '30d', '2w' (a bare number is seconds)."""
    match = _DURATION.match(text.strip())
    if match is None or float(match[1]) <= 0:
        raise UsageError(f"{what} {text!r} is not a duration such as 30d, 12h, 15m or 90s")
    seconds = Decimal(match[1]) * _UNIT_S[match[2] or "s"]
    if seconds > _MAX_DURATION_S:
        raise UsageError(f"{what} {text!r} is longer than the store's whole time range")
    return int(seconds * NS_PER_S)
