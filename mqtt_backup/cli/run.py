"""`mqtt-backup run`: its options are the settings config.py declares, one flag each.

A setting added to `config.Settings` is a `run` flag with no edit here: its name gives the flag,
its declaration the help. The flag's click type only splits what click should refuse (a whole
number that is not one, with the usual 'Try: mqtt-backup run --help') from what config.py checks
(ranges, choices, URLs, templates), whose error names the flag, the variable or the file key.
"""

from __future__ import annotations

import gc
import os
import signal
import types
from pathlib import Path
from types import FrameType
from typing import Any, get_args, get_origin, get_type_hints

import click

from mqtt_backup import config, logs
from mqtt_backup.errors import BackupError

# The cyclic GC's youngest generation filled every ~600 messages on the ingest path (a tuple per
# message held until its commit), and its older collections walked every object of the start-up:
# ~12% of the ingest loop's CPU. Start-up's objects are frozen out of it (they live as long as
# the process), and it collects after this many new objects instead of 700.
GC_YOUNG_OBJECTS = 50_000

_HELP = "Run the bridge: store every message of the topic templates, acknowledged after fsync."
_CONFIG_HELP = "TOML config file [default: ./mqtt-backup.toml when present]"


def command() -> click.Command:
    """The `run` command, one option per declared setting plus `--config`."""
    options = [
        _option(name, kind)
        for name, kind in get_type_hints(config.Settings).items()
        if not config.declared(name).env_only  # a secret: never a flag, which `ps` would show
    ]
    config_option = click.Option(
        ["--config", "config_file"], type=click.Path(path_type=Path), help=_CONFIG_HELP
    )
    return click.Command("run", callback=_run, params=[*options, config_option], help=_HELP)


def _option(name: str, kind: Any) -> click.Option:
    if get_origin(kind) is types.UnionType:
        (kind,) = (a for a in get_args(kind) if a is not type(None))
    many = get_origin(kind) is tuple
    return click.Option(
        [config.flag_name(name), name],
        type=_click_type(kind),
        multiple=many,
        help=config.help_for(name),
    )


def _click_type(kind: Any) -> click.ParamType[Any]:
    # Enums, URLs and the like stay text: config.py refuses them naming where they came from.
    if kind is int:
        return click.INT
    if kind is float:
        return click.FLOAT
    if kind is Path:
        return click.Path(path_type=Path)
    return click.STRING


def _run(config_file: Path | None, **flags: Any) -> None:
    given = {name: _given(value) for name, value in flags.items()}
    with logs.held():
        try:
            settings = config.load(given, os.environ, config_file)
        except BackupError:
            _log_as_asked(given)
            raise
    logs.configure(
        settings.log_level, settings.log_format, secrets=[settings.broker_address.password]
    )
    # The store opens and the client-id check runs while the bridge's modules are imported, once
    # the settings hold (a bad flag or file answers without them): docs/design-notes.md, "Start-up".
    from mqtt_backup.startup import Startup  # noqa: PLC0415

    startup = Startup(settings)
    startup.check_client_id()
    from mqtt_backup.bridge import Bridge  # noqa: PLC0415

    bridge = Bridge(settings, startup=startup)
    bridge.connect()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        bridge.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    quieter_gc()
    bridge.run()


def _log_as_asked(given: dict[str, Any]) -> None:
    """Settings that do not load: their error line in the format a flag or the environment asked.

    A log collector reading `--log-format json` must not meet a bare text line last; a format
    asked for only in a config file that did not load cannot be known.
    """
    asked = given.get("log_format") or os.environ.get(config.env_name("log_format"), "")
    if str(asked).strip().lower() == config.LogFormat.JSON.value:
        logs.configure("ERROR", config.LogFormat.JSON)


def quieter_gc() -> None:
    """The cyclic GC as the running bridge wants it (GC_YOUNG_OBJECTS)."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_OBJECTS, older, oldest)


def _given(value: Any) -> Any:
    """None for a flag not given (a repeatable one comes as an empty tuple)."""
    return None if value == () else value
