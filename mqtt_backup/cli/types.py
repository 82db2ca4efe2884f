"""Click parameter types: a bad time, duration, filter, device id, rate or weight fails at parse.

Each type calls the project's pure validator with the option's own name, so the one line the user
sees is the validator's (`--since 'x' is neither RFC 3339 ... nor epoch seconds`), the same text a
restore request or a config file gets. The UsageError it raises reaches the one error mapping in
`cli.main` like any other BackupError.
"""

from __future__ import annotations

import math
from typing import Any

import click

from mqtt_backup.errors import UsageError
from mqtt_backup.restore.request import MIN_RATE
from mqtt_backup.times import parse_duration, parse_time
from mqtt_backup.topics import check_device, check_filter

# MIN_RATE is the slowest replay the bridge accepts: a replay holds one of its few restore slots.
# Checked here too, so the CLI says so with exit 2 instead of sending a request the bridge refuses
# (which is exit 1).


def _name(param: click.Parameter | None) -> str:
    """How the user typed the parameter: `--since`, or `DEVICE` for an argument."""
    if param is None:
        return "value"
    if isinstance(param, click.Argument):
        return param.human_readable_name
    return max(param.opts, key=len)


class Time(click.ParamType[int]):
    """RFC 3339 text or epoch seconds -> nanoseconds since the epoch."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        """Nanoseconds; UsageError naming the option."""
        return parse_time(value, _name(param))


class Duration(click.ParamType[int]):
    """'30d', '12h', '90m', '45s' (a bare number is seconds) -> nanoseconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        """Nanoseconds; UsageError naming the option."""
        return parse_duration(value, _name(param))


class TopicFilter(click.ParamType[str]):
    """An MQTT topic filter (`+` a whole level, `#` a whole last level)."""

    name = "filter"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """The filter; UsageError when a wildcard is misplaced."""
        return check_filter(value)


class DeviceId(click.ParamType[str]):
    """A device id that a restore request can name: one topic level, no wildcards.

    `stored` also takes "" (an empty topic level's device), which no restore topic can name.
    """

    name = "device"

    def __init__(self, stored: bool = False) -> None:
        self.stored = stored

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """The id; UsageError when it is not one topic level."""
        return check_device(value, stored=self.stored)


def _positive(value: Any, what: str) -> float:
    """A finite number > 0; UsageError naming `what` for text, 0, a negative, inf or nan."""
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{what} must be a finite number > 0, not {value!r}") from None
    if not 0 < number < math.inf:  # also refuses nan, which JSON cannot carry
        raise UsageError(f"{what} must be a finite number > 0, not {number:g}")
    return number


class Weight(click.ParamType[float]):
    """A partition's placement weight: a finite number > 0."""

    name = "weight"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        """The weight; UsageError naming the option for text, 0, a negative, inf or nan."""
        return _positive(value, _name(param))


class Rate(click.ParamType[float]):
    """Messages per second: a finite number, at least MIN_RATE."""

    name = "rate"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        """The rate; UsageError for text, 0, a negative, inf, nan or less than MIN_RATE."""
        what = _name(param)
        rate = _positive(value, what)
        if rate < MIN_RATE:
            raise UsageError(
                f"{what} must be at least {MIN_RATE} messages per second "
                f"(one message in {1 / MIN_RATE:g} s), not {rate:g}"
            )
        return rate


TIME = Time()
DURATION = Duration()
TOPIC_FILTER = TopicFilter()
DEVICE_ID = DeviceId()
# export and forget: every id that can be stored.
STORED_DEVICE_ID = DeviceId(stored=True)
RATE = Rate()
WEIGHT = Weight()
