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


def load_settings(config_file: Path | None, **flags: Any) -> config.Settings:
    """Settings for a command: defaults < file < MQTT_BACKUP_* < flags."""
    return config.load(flags, os.environ, config_file)
