"""Nanosecond timestamps: RFC 3339 rendering and parsing of user-given times."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_backup import times
from mqtt_backup.errors import EXIT_USAGE, UsageError
from mqtt_backup.times import NS_PER_S, format_ts, parse_time
from tests.conftest import examples

T0 = 1_795_514_400  # 2026-11-24T10:00:00Z
RFC3339_NS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z$")
# Up to the end of 9999 (what datetime renders).
MAX_NS = times.MAX_NS  # keys hold 64-bit nanoseconds: 2554-07-21T23:34:33.709551615Z


@pytest.mark.parametrize(
    ("ts_ns", "text"),
    [
        (0, "1970-01-01T00:00:00.000000000Z"),
        (1, "1970-01-01T00:00:00.000000001Z"),
        (999_999_999, "1970-01-01T00:00:00.999999999Z"),
        (T0 * NS_PER_S, "2026-11-24T10:00:00.000000000Z"),
        (T0 * NS_PER_S + 123_456_789, "2026-11-24T10:00:00.123456789Z"),
        (951_782_400 * NS_PER_S, "2000-02-29T00:00:00.000000000Z"),
        (2**63 - 1, "2262-04-11T23:47:16.854775807Z"),
    ],
)
def test_format_ts(ts_ns: int, text: str) -> None:
    assert format_ts(ts_ns) == text


@settings(max_examples=examples(300), deadline=None)
@given(ts_ns=st.integers(0, MAX_NS))
def test_format_ts_shape_and_round_trip(ts_ns: int) -> None:
    text = format_ts(ts_ns)
    assert RFC3339_NS.match(text), text
    assert parse_time(text) == ts_ns


@pytest.mark.parametrize(
    ("text", "ts_ns"),
    [
        ("2026-11-24T10:00:00Z", T0 * NS_PER_S),
        ("2026-11-24T10:00:00z", T0 * NS_PER_S),
        ("2026-11-24t10:00:00Z", T0 * NS_PER_S),
        ("2026-11-24 10:00:00Z", T0 * NS_PER_S),
        ("2026-11-24T10:00:00+00:00", T0 * NS_PER_S),
        ("2026-11-24T11:30:00+01:30", T0 * NS_PER_S),
        ("2026-11-24T05:00:00-05:00", T0 * NS_PER_S),
        ("2026-11-24T10:00:00.5Z", T0 * NS_PER_S + 500_000_000),
        ("2026-11-24T10:00:00.123Z", T0 * NS_PER_S + 123_000_000),
        ("2026-11-24T10:00:00.123456Z", T0 * NS_PER_S + 123_456_000),
        ("2026-11-24T10:00:00.123456789Z", T0 * NS_PER_S + 123_456_789),
        ("2026-11-24T10:00:00.000000001Z", T0 * NS_PER_S + 1),
        ("2026-11-24T10:00:00.1234567891234Z", T0 * NS_PER_S + 123_456_789),  # beyond ns: cut
        ("2026-11-24T12:00:00.999999999+02:00", T0 * NS_PER_S + 999_999_999),
        ("  2026-11-24T10:00:00Z\n", T0 * NS_PER_S),
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T01:00:00+01:00", 0),
    ],
)
def test_parse_rfc3339(text: str, ts_ns: int) -> None:
    assert parse_time(text) == ts_ns


@pytest.mark.parametrize(
    ("value", "ts_ns"),
    [
        (0, 0),
        (T0, T0 * NS_PER_S),
        (1.5, 1_500_000_000),
        (0.000000001, 1),
        (0.25, 250_000_000),
        (float(T0), T0 * NS_PER_S),
        (10**10, 10**19),  # large ints stay exact
        ("0", 0),
        (str(T0), T0 * NS_PER_S),
        (f" {T0} ", T0 * NS_PER_S),
        ("1.5", 1_500_000_000),
        (f"{T0}.25", T0 * NS_PER_S + 250_000_000),
        (".5", 500_000_000),
        ("7.", 7 * NS_PER_S),
    ],
)
def test_parse_epoch_seconds(value: str | float, ts_ns: int) -> None:
    assert parse_time(value) == ts_ns


@settings(max_examples=examples(200), deadline=None)
@given(seconds=st.integers(0, 2**34))
def test_epoch_int_and_text_agree(seconds: int) -> None:
    assert parse_time(seconds) == parse_time(str(seconds)) == seconds * NS_PER_S


@settings(max_examples=examples(200), deadline=None)
@given(seconds=st.floats(0, 2**33, allow_nan=False, allow_infinity=False))
def test_epoch_float_is_close(seconds: float) -> None:
    got = parse_time(seconds)
    assert abs(got - seconds * NS_PER_S) <= max(1.0, abs(seconds) * NS_PER_S * 1e-15)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("2026-11-24T10:00:00", "needs a time zone"),
        ("2026-11-24T10:00:00.5", "needs a time zone"),
        ("2026-11-24", "is neither RFC 3339"),
        ("yesterday", "is neither RFC 3339"),
        ("", "is neither RFC 3339"),
        ("   ", "is neither RFC 3339"),
        ("2026-13-01T00:00:00Z", "is not a valid time"),
        ("2026-11-24T25:00:00Z", "is not a valid time"),
        ("2026-11-24T10:00:00+25:00", "is not a valid time"),
        ("10:00:00Z", "is neither RFC 3339"),
        ("1.2.3", "is neither RFC 3339"),
        ("12abc", "is neither RFC 3339"),
        ("nan", "is neither RFC 3339"),
        ("inf", "is neither RFC 3339"),
        ("-5", "must not be before 1970"),
        ("-0.5", "must not be before 1970"),
        (-1, "must not be before 1970"),
        (-0.001, "must not be before 1970"),
        ("1969-12-31T23:59:59Z", "must not be before 1970"),
        ("1970-01-01T00:00:00+01:00", "must not be before 1970"),
        (math.nan, "must be a finite number"),
        (math.inf, "must be a finite number"),
        (-math.inf, "must be a finite number"),
        ("nan.0", "is neither RFC 3339"),
        ("inf.5", "is neither RFC 3339"),
        (True, "must be RFC 3339 text or epoch seconds"),
        (False, "must be RFC 3339 text or epoch seconds"),
    ],
)
def test_parse_time_errors(value: str | float, problem: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_time(value, "--since")
    message = str(info.value)
    assert problem in message
    assert message.startswith("--since")  # names what was being parsed
    assert info.value.exit_code == EXIT_USAGE


def test_parse_time_default_name() -> None:
    with pytest.raises(UsageError, match=r"^time "):
        parse_time("garbage")
