"""The `mqtt-backup` command group, `--version`, and the one place errors become exit codes.

Every error, from click's parser, a parameter type, a command or a bug, goes through `Root.main`,
also under a test runner, so in-process tests see what a user sees: one line on stderr and an exit
code: 0 ok, 1 runtime failure, 2 usage or bad input, 3 broker unreachable or refused, 4 storage.
"""

from __future__ import annotations

import errno
import importlib
import os
import platform
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NoReturn

import click
import typer
from typer.core import TyperGroup

import mqtt_backup
from mqtt_backup.cli import run
from mqtt_backup.cli.output import PROG, drop_stdout, error_line
from mqtt_backup.errors import EXIT_RUNTIME, EXIT_USAGE, BackupError

# Interrupted by Ctrl-C: the shell's convention, 128 + SIGINT.
EXIT_INTERRUPTED = 130


def version_text() -> str:
    """`mqtt-backup 0.1.0 (python 3.11.2, paho-mqtt 2.1.0, ...)`: what a bug report needs."""
    from importlib import metadata  # noqa: PLC0415 - ~20 ms that `run` should not pay

    parts = [f"python {platform.python_version()}"]
    for dist in ("paho-mqtt", "mqtt5", "rocksdict"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} missing")
    return f"{PROG} {mqtt_backup.__version__} ({', '.join(parts)})"


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


# Each command's module, in the order `--help` lists them. A module is imported when one of its
# commands is looked up, so `run` (and a bad command line) never pays for the imports of the
# others (rich, the restore client, storage maintenance, ...): docs/design-notes.md, "Start-up".
# tests/test_cli_lazy.py checks this table against the modules' own commands.
COMMAND_MODULES: dict[str, str] = {
    "devices": "read",
    "export": "read",
    "verify": "read",
    "stats": "read",
    "restore": "restore",
    "status": "status",
    "snapshot": "maintenance",
    "prune": "maintenance",
    "forget": "maintenance",
    "partitions": "maintenance",
    "simulate": "simulate",
    "web": "web",
}


def module_commands(module: str) -> dict[str, click.Command]:
    """The click commands of `mqtt_backup.cli.<module>`'s typer app, as the root holds them."""
    typer_app = importlib.import_module(f"mqtt_backup.cli.{module}").app
    holder = typer.Typer(**_APP_SETTINGS)  # the root's settings: the same help, the same errors
    holder.add_typer(typer_app)
    holder.callback()(_root)  # typer then builds a group, as for the root
    group = typer.main.get_command(holder)
    assert isinstance(group, click.Group)
    return dict(group.commands)


class LazyCommands(Mapping[str, click.Command]):
    """The root's commands by name; a command's module is imported on its first lookup."""

    def __init__(self, loaded: dict[str, click.Command], lazy: Mapping[str, str]) -> None:
        self._loaded = loaded
        self._lazy = dict(lazy)

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded and name in self._lazy:
            self._loaded.update(module_commands(self._lazy[name]))
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter({**self._loaded, **dict.fromkeys(self._lazy)})

    def __len__(self) -> int:
        return len(self._loaded.keys() | self._lazy.keys())

    def __setitem__(self, name: str, command: click.Command) -> None:  # click's add_command
        self._loaded[name] = command


class Root(TyperGroup):
    """The top-level group: typer's commands, plus `run` (built from the settings) and --version."""

    def __init__(self, **attrs: Any) -> None:
        commands = attrs.pop("commands", None) or {}
        super().__init__(**attrs)
        self.commands = LazyCommands({"run": run.command(), **commands}, COMMAND_MODULES)  # type: ignore[assignment]
        version = click.Option(
            ["--version"],
            is_flag=True,
            expose_value=False,
            is_eager=True,
            callback=_show_version,
            help="show the version (and those of python, paho-mqtt, mqtt5, rocksdict) and exit",
        )
        self.params.append(version)

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> NoReturn:
        """Run a command line; exit with its code after at most one line on stderr."""
        del prog_name  # always PROG, also under a test runner
        argv = list(args) if args is not None else sys.argv[1:]
        extra.pop("standalone_mode", None)
        try:
            code = super().main(argv, PROG, standalone_mode=False, **extra)
            sys.stdout.flush()  # a full disk shows here, not as Python's own complaint at exit
        except BaseException as exc:  # noqa: BLE001 - the one place every error becomes a code
            sys.exit(_report(exc, argv, self))
        sys.exit(code if isinstance(code, int) else 0)


def _report(exc: BaseException, argv: list[str], root: click.Group) -> int:  # noqa: PLR0911 - one case per kind
    """Say what went wrong in one line (help for a bare command group); return the exit code."""
    match exc:
        case click.exceptions.NoArgsIsHelpError():
            sys.stderr.write(exc.format_message() + "\n")
            return EXIT_USAGE
        case click.UsageError():
            where = _command_path(exc, argv, root)
            error_line(f"{_sentence(exc.format_message())} Try: {where} --help")
            return EXIT_USAGE
        case click.ClickException():
            error_line(exc.format_message())
            return exc.exit_code
        case click.exceptions.Exit():
            return exc.exit_code
        case click.Abort() | KeyboardInterrupt():
            return EXIT_INTERRUPTED
        case BackupError():
            error_line(exc.message())
            return exc.exit_code
        case SystemExit():
            raise exc
        case OSError() if exc.errno in _DISK_FULL:
            # Storage says its own disk errors (StorageError): a full disk here is the output's,
            # a table or lines on stdout (`> file`), as `--output FILE` says it (exit 2).
            drop_stdout()
            error_line(f"cannot write the output: {os.strerror(exc.errno or 0)}")
            return EXIT_USAGE
        case _ if os.environ.get("MQTT_BACKUP_DEBUG"):
            raise exc
        case _:
            # A bug, not a user's mistake: still one line; the traceback when asked for.
            error_line(
                f"internal error: {type(exc).__name__}: {exc}. Try: MQTT_BACKUP_DEBUG=1 "
                "for the traceback, and report it"
            )
            return EXIT_RUNTIME


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _sentence(text: str) -> str:
    """The text ending in one stop: click's "Did you mean '--x'?" keeps its question mark."""
    text = text.rstrip()
    return text if text.endswith((".", "?", "!")) else text + "."


def _command_path(exc: click.UsageError, argv: list[str], root: click.Group) -> str:
    # A missing option value is reported with the group's context: name the subcommand anyway.
    if exc.ctx is not None and exc.ctx.command_path != PROG:
        return exc.ctx.command_path
    command = next((a for a in argv if not a.startswith("-")), None)
    return f"{PROG} {command}" if command in root.commands else PROG


_APP_SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": None,
    # click itself says "Did you mean 'restore'?": typer's own suggestion would say it twice.
    "suggest_commands": False,
}
app = typer.Typer(
    name=PROG,
    cls=Root,
    help="Back up every message an MQTT broker delivers; give it back over MQTT.",
    no_args_is_help=True,
    **_APP_SETTINGS,
)


@app.callback()
def _root() -> None:
    # Its commands are Root's (loaded on demand): a callback makes typer build the group anyway.
    pass


def main(argv: list[str] | None = None) -> NoReturn:
    """Console script: the whole command line, errors included, is `Root.main`."""
    typer.main.get_command(app).main(argv)
    raise AssertionError("Root.main exits")  # pragma: no cover
