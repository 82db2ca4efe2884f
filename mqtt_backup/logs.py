"""Log output: text for people (the default) or JSON lines for log collectors (`--log-format`).

A JSON line holds time (RFC 3339 UTC), level, logger, message, and the event's fields (what a
call passes as `extra=`). Both formats pass through `Redact`, so a secret the process knows (the
broker password) never reaches a log line, whoever logged it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from mqtt_backup.config import LogFormat

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK = "***"

# What every LogRecord carries; anything else on a record is a field of the event.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 message`, `2 messages` (`plural` for a noun that is not one `s` away)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as `{"time", "level", "logger", "message", ...fields}`."""
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        body.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            body["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(body, default=str, ensure_ascii=False)


class _Shown:
    """A log call's argument as `%s`, `%r` or a format spec shows it, with the secrets masked."""

    def __init__(self, value: object, hide: Callable[[str], str]) -> None:
        self._value, self._hide = value, hide

    def __str__(self) -> str:
        return self._hide(str(self._value))

    def __repr__(self) -> str:
        return self._hide(repr(self._value))

    def __format__(self, spec: str) -> str:
        return self._hide(format(self._value, spec))


class Redact(logging.Filter):
    """Replaces each secret in a record's arguments (or its whole text) and fields by `***`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        if not self._secrets:
            return True
        record.msg, record.args = self._message(record), None
        for key, value in vars(record).items():
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, self._hide(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._hide(record.exc_text)
        return True

    def _message(self, record: logging.LogRecord) -> str:
        """The final text, the secrets masked where they can come in.

        A template with arguments is the program's own text: the secret comes in through the
        arguments only, and masking the template too would turn a password that is also a word
        ("pass") into "--***word-file", showing by where the stars fall what it is.
        """
        args = record.args
        values = args.values() if isinstance(args, Mapping) else args or ()
        if not values or not isinstance(record.msg, str) or any(map(self._in_number, values)):
            return self._hide(record.getMessage())
        try:
            if isinstance(args, Mapping):
                return record.msg % {key: self._shown(value) for key, value in args.items()}
            return record.msg % tuple(self._shown(value) for value in values)
        except (TypeError, ValueError, KeyError):  # a template the arguments do not fit
            return self._hide(record.getMessage())

    def _in_number(self, value: object) -> bool:
        # A number stays a number for `%d`, so a password of digits in one masks the whole text.
        return isinstance(value, int | float) and self._hide(str(value)) != str(value)

    def _shown(self, value: object) -> object:
        return value if isinstance(value, int | float) else _Shown(value, self._hide)

    def _hide(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text


def configure(
    level: str,
    log_format: LogFormat = LogFormat.TEXT,
    secrets: Iterable[str | None] = (),
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send the process's logs to `stream` (stderr) in `log_format`; returns the handler.

    Replaces the root logger's handlers, so calling it again (tests) does not double the lines.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == LogFormat.JSON else logging.Formatter(TEXT_FORMAT)
    )
    handler.addFilter(Redact(s for s in secrets if s))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    global _json_handler  # noqa: PLW0603 - the process has one log configuration
    _json_handler = handler if log_format == LogFormat.JSON else None
    while _pending:  # what was held while the settings loaded (`held`)
        record = _pending.pop(0)
        logging.getLogger(record.name).handle(record)
    return handler


def error_line(text: str) -> str:
    """The line that ends the process with an error: a JSON log line when the logs are JSON.

    A log collector reading `--log-format json` should not meet a bare text line as the last
    word of a failed start; the secrets are masked as in every other line.
    """
    handler = _json_handler
    if handler is None or handler not in logging.getLogger().handlers:
        return text  # not configured, or replaced since (an in-process caller's own handler)
    record = logging.LogRecord("mqtt_backup", logging.ERROR, "", 0, text, None, None)
    handler.filter(record)
    return handler.format(record)


_json_handler: logging.Handler | None = None


class _Hold(logging.Handler):
    """Keeps records instead of writing them (see `held`)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep it."""
        self.records.append(record)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold what is logged while the settings load, and write it once `configure` ran.

    Loading the settings may warn (a password in --broker), but the settings decide the log
    format: without this, such a warning would be a bare text line among JSON ones. When
    loading fails, the held records go out as text (there is no format to honour then).
    """
    hold = _Hold()
    root = logging.getLogger()
    root.addHandler(hold)
    try:
        yield
    except BaseException:
        root.removeHandler(hold)
        if (last := logging.lastResort) is not None:
            for record in hold.records:
                last.handle(record)
        raise
    root.removeHandler(hold)
    _pending.extend(hold.records)


_pending: list[logging.LogRecord] = []
