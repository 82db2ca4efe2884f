"""What the commands print: JSON documents, tables, lines, progress; the one Console.

Stored data is shown as it is: a device id such as `[red]x[` is text, never rich markup.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mqtt_backup import jsontext, logs
from mqtt_backup.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console

# rich is imported where a table or a progress bar is drawn: `run` and the error path never
# draw one, and importing it costs every start (docs/design-notes.md, "Start-up").

PROG = "mqtt-backup"
# Piped output is for reading in full: tables are not cut to 80 columns.
_PIPED_WIDTH = 250


def console(*, stderr: bool = False) -> Console:
    """The Console of every table and progress bar: no markup, no emoji, no highlighting."""
    from rich.console import Console  # noqa: PLC0415 - see the imports

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else _PIPED_WIDTH
    return Console(
        file=stream, width=width, markup=False, emoji=False, highlight=False, stderr=stderr
    )


def print_json(document: Any) -> None:
    """One JSON document on stdout (lists as an array)."""
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


def json_line(out: TextIO, document: dict[str, Any]) -> None:
    """One JSON object on one line (export and restore output): `json.dumps`'s text, UTF-8."""
    out.write(jsontext.dumps(document) + "\n")


def say(text: str) -> None:
    """One line of text on stdout."""
    sys.stdout.write(text + "\n")


def note(text: str) -> None:
    """One line on stderr: summaries and what goes beside the data on stdout."""
    sys.stderr.write(text + "\n")


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 message`, `2 messages` (`plural` for a noun that is not one `s` away)."""
    return logs.count(n, noun, plural)


def error_line(message: str) -> None:
    """The one line of an error (a JSON log line under `run --log-format json`)."""
    sys.stderr.write(logs.error_line(f"{PROG}: {message}") + "\n")


def table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A table on stdout; each cell as its text (None shows as '-')."""
    from rich.table import Table  # noqa: PLC0415 - see the imports

    shown = Table(*columns)
    for row in rows:
        shown.add_row(*("-" if cell is None else str(cell) for cell in row))
    console().print(shown)


@contextmanager
def output_file(path: str) -> Iterator[TextIO]:
    """The file to write, or stdout for '-'; a path that cannot be written is a usage error."""
    if path == "-":
        try:
            yield sys.stdout
            sys.stdout.flush()  # a full disk shows here, not as Python's own message at exit
        except BrokenPipeError:
            raise  # a reader that went away (`| head`): not a problem to report
        except OSError as exc:
            drop_stdout()
            raise UsageError(f"cannot write the standard output: {exc.strerror or exc}") from exc
        return
    try:
        with Path(path).open("w", encoding="utf-8", newline="") as handle:
            yield handle
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def drop_stdout() -> None:
    """What stdout still buffers goes nowhere: a second try at exit would fail again, aloud."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@contextmanager
def progress(unit: str = "messages") -> Iterator[Callable[[int], None]]:
    """A live count on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield lambda _count: None
        return
    from rich.progress import (  # noqa: PLC0415 - see the imports
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.completed} " + unit),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(unit, total=None)
        yield lambda count: bar.update(task, completed=count)
