"""`mqtt-backup status`: the bridges that announced themselves on the status topic."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from mqtt_backup.cli import output
from mqtt_backup.cli.options import (
    BrokerOpt,
    CaOpt,
    CertOpt,
    ConfigOpt,
    JsonOpt,
    KeyOpt,
    NamespaceOpt,
    ProtocolOpt,
    load_settings,
)
from mqtt_backup.config import Settings
from mqtt_backup.errors import BackupError, BrokerRefused, StatusClientRefused, UsageError
from mqtt_backup.mqtt import CodecConnection
from mqtt_backup.status import Member, read_members, status_filter

app = typer.Typer()


class NoBridge(BackupError):
    """no bridge announced itself: {detail}"""


async def _members(settings: Settings, wait: float) -> list[Member]:
    async with CodecConnection(settings.broker_target) as conn:
        found = await read_members(conn, settings.namespace, wait)
    return sorted(found.values(), key=lambda m: (m.group, m.name))


@app.command()
def status(
    broker: BrokerOpt = None,
    wait: Annotated[
        float, typer.Option(help="seconds to wait for the retained status messages")
    ] = 2.0,
    as_json: JsonOpt = False,
    namespace: NamespaceOpt = None,
    protocol: ProtocolOpt = None,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    config_file: ConfigOpt = None,
) -> None:
    """List the bridges on the status topic (online, or offline by their will); exit 1 if none."""
    settings = load_settings(
        config_file,
        broker=broker,
        namespace=namespace,
        protocol=protocol,
        ca=ca,
        cert=cert,
        key=key,
    )
    if not wait > 0:
        raise UsageError("--wait must be > 0")
    try:
        members = asyncio.run(_members(settings, wait))
    except BrokerRefused as exc:  # it is this command's client the broker refused
        raise StatusClientRefused(exc.detail, exc.hint) from None
    if as_json:
        output.print_json([m.row() for m in members])
    elif members:
        output.table(
            ("group", "instance", "state", "mqtt", "client id", "started", "partitions"),
            (
                (
                    m.group,
                    m.name,
                    m.body.get("state"),
                    m.body.get("mqtt"),  # what it reads on: a group replay needs 5 everywhere
                    m.client_id,
                    m.body.get("started"),
                    len(m.body.get("partitions") or ()),
                )
                for m in members
            ),
        )
    if not members:
        raise NoBridge(
            f"nothing on {status_filter(settings.namespace)} within {wait:g} s",
            "check --broker and --namespace, that 'mqtt-backup run' runs there, or raise --wait",
        )
