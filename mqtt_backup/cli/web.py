"""`mqtt-backup web`: the read-only browser view of the store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mqtt_backup.cli import output
from mqtt_backup.cli.options import ConfigOpt, DataOpt, load_settings

app = typer.Typer()


@app.command()
def web(
    data: DataOpt = None,
    bind: Annotated[
        str,
        typer.Option(help="HOST:PORT to serve on; an address other than loopback needs a token"),
    ] = "127.0.0.1:8080",
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="file holding the access token (or the token itself in env "
            "MQTT_BACKUP_WEB_TOKEN); never a flag value",
        ),
    ] = None,
    config_file: ConfigOpt = None,
) -> None:
    """Browse devices, their messages, plots and gaps (read-only; works beside a running bridge)."""
    # Imported here: starlette and uvicorn cost every other command their start-up time.
    from mqtt_backup.web import run_web  # noqa: PLC0415

    store = load_settings(config_file, data=data).data

    def ready(url: str) -> None:
        output.note(f"web view of {store} at {url} (read-only; Ctrl-C stops)")

    run_web(store, bind, token_file, ready=ready)
