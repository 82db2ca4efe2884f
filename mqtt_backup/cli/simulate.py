"""`mqtt-backup simulate`: a fleet of devices publishing realistic telemetry."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from mqtt_backup.cli import output
from mqtt_backup.cli.options import (
    BrokerOpt,
    CaOpt,
    CertOpt,
    ConfigOpt,
    KeyOpt,
    ProtocolOpt,
    load_settings,
)
from mqtt_backup.simulate import FleetProgress, FleetReport, FleetSpec, run_fleet

app = typer.Typer()


@app.command()
def simulate(
    broker: BrokerOpt = None,
    devices: Annotated[int, typer.Option(help="devices in the fleet")] = 10,
    rate: Annotated[float, typer.Option(help="messages per second, the whole fleet")] = 10.0,
    duration: Annotated[float, typer.Option(help="seconds to run; 0 runs until Ctrl-C")] = 60.0,
    prefix: Annotated[
        str, typer.Option(help="device ids are PREFIX-0000, PREFIX-0001, ...")
    ] = "sim",
    qos: Annotated[int, typer.Option(help="0 or 1")] = 1,
    protocol: ProtocolOpt = None,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    config_file: ConfigOpt = None,
) -> None:
    """Publish realistic telemetry from a fleet of devices (JSON, binary, several topic shapes)."""
    settings = load_settings(
        config_file, broker=broker, protocol=protocol, ca=ca, cert=cert, key=key
    )
    spec = FleetSpec(
        target=settings.broker_target,
        devices=devices,
        rate=rate,
        duration=duration,
        prefix=prefix,
        qos=qos,
    )
    templates = " ".join(f"--topic '{t}'" for t in spec.topics_for_bridge)
    said = (
        f"simulating {output.count(devices, 'device')} at {rate:g} msg/s "
        f"on {settings.broker_address}; "
        f"the bridge stores every shape with: mqtt-backup run {templates}"
    )
    # Said once connected: a broker that is down gets its one error line, not this first.
    report = asyncio.run(_fleet_until_interrupted(spec, lambda: output.note(said)))
    output.note(
        f"published {output.count(report.published, 'message')} "
        f"(+{output.count(report.retained, 'retained status', 'retained statuses')}) from "
        f"{output.count(report.devices, 'device')} "
        f"in {report.elapsed:.1f} s ({report.rate:.0f} msg/s)"
    )


async def _fleet_until_interrupted(spec: FleetSpec, connected: Callable[[], None]) -> FleetReport:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def show(progress: FleetProgress) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{progress.published} published, {progress.rate:.0f} msg/s ")

    return await run_fleet(spec, stop, show, connected)
