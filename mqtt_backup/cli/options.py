"""Options several commands share, and the settings they load.

Connection and data options are settings (config.py declares their help, env variable and file
key); selectors such as `--json` and `--dry-run` are flags of one invocation only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from mqtt_backup import config
from mqtt_backup.cli.types import TIME, TOPIC_FILTER
from mqtt_backup.errors import UsageError


def _setting(name: str) -> Any:
    """A typer option for one setting: its flag and help as config.py declares them."""
    return typer.Option(config.flag_name(name), help=config.help_for(name))


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file [default: ./mqtt-backup.toml when present]"),
]
BrokerOpt = Annotated[str | None, _setting("broker")]
DataOpt = Annotated[Path | None, _setting("data")]
NamespaceOpt = Annotated[str | None, _setting("namespace")]
ProtocolOpt = Annotated[str | None, _setting("protocol")]
CaOpt = Annotated[Path | None, _setting("ca")]
CertOpt = Annotated[Path | None, _setting("cert")]
KeyOpt = Annotated[Path | None, _setting("key")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="only say what would change")]
# The selectors of `export` and `restore`; here, not in `read`, so that `restore` does not
# import the storage that `read` opens.
SinceOpt = Annotated[
    int | None, typer.Option(click_type=TIME, help="from (RFC 3339 or epoch s), inclusive")
]
UntilOpt = Annotated[
    int | None, typer.Option(click_type=TIME, help="to (RFC 3339 or epoch s), exclusive")
]
TopicFilterOpt = Annotated[
    str | None, typer.Option("--topic", click_type=TOPIC_FILTER, help="MQTT filter on the topic")
]
OutputOpt = Annotated[str, typer.Option("--output", help="file, or - for stdout")]


def check_window(since_ns: int | None, until_ns: int | None) -> None:
    """UsageError when the window ends before it starts (equal is an empty window)."""
    if since_ns is not None and until_ns is not None and since_ns > until_ns:
        raise UsageError("--since is after --until")


def load_settings(config_file: Path | None, **flags: Any) -> config.Settings:
    """Settings for a command: defaults < file < MQTT_BACKUP_* < flags."""
    return config.load(flags, os.environ, config_file)
