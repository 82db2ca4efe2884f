"""The network between bridge and broker breaks: a loopback proxy resets or blackholes it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Broker, wait_until
from tests.faults.conftest import Report
from tests.faults.harness import (
    RATE,
    Proxy,
    Publisher,
    above,
    assert_nothing_lost,
    bridge_process,
    fleet,
    read_back,
    size,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("transport")]  # both transports

KEEPALIVE_S = 5  # the smallest --keepalive the bridge takes


@pytest.fixture
def proxy(own_broker: Broker) -> Iterator[Proxy]:
    """A proxy in front of the session's own_broker."""
    found = Proxy(own_broker.port)
    yield found
    found.close()


def test_network_cut_resets_the_connection(
    own_broker: Broker, proxy: Proxy, data_dir: Path, unique: str, tmp_path: Path, report: Report
) -> None:
    """Network cut: the connection is reset during a continuous publish"""
    cuts, between = size(3, 10), size(250, 1000)
    with bridge_process(proxy.url, data_dir, tmp_path / "bridge.log") as bridge:
        bridge.start()
        publisher = Publisher(own_broker.port, fleet(unique, 4), rate=RATE).start()
        for _ in range(cuts):
            publisher.wait_accepted(between)
            connections = proxy.connections
            proxy.drop()
            publisher.wait_accepted(between // 4)  # devices go on publishing meanwhile
            proxy.heal()
            wait_until(above(lambda: proxy.connections, connections + 1), 60, "both reconnections")
        publisher.wait_accepted(between)
        ledger = publisher.stop()
        back = read_back(ledger, data_dir, proxy.url)
        log = bridge.text()
    report(cuts=cuts, export=back.export, restore=back.restore)
    assert_nothing_lost(back)
    assert "Traceback" not in log


def test_network_blackhole_longer_than_keepalive(
    own_broker: Broker, proxy: Proxy, data_dir: Path, unique: str, tmp_path: Path, report: Report
) -> None:
    """Network blackhole (nothing flows, nothing closes) longer than the keepalive"""
    log_path = tmp_path / "bridge.log"
    with bridge_process(proxy.url, data_dir, log_path, "--keepalive", str(KEEPALIVE_S)) as bridge:
        bridge.start()
        publisher = Publisher(own_broker.port, fleet(unique, 4), rate=RATE).start()
        publisher.wait_accepted(size(250, 1000))
        proxy.blackhole()
        # Only the keepalive can notice a dead route: wait until the bridge has.
        wait_until(
            lambda: "lost the broker connection" in bridge.text(),
            6 * KEEPALIVE_S,
            "the bridge to notice the dead route",
        )
        publisher.wait_accepted(size(250, 1000))
        proxy.heal()
        wait_until(lambda: "reconnected to" in bridge.text(), 90, "the bridge to reconnect")
        publisher.wait_accepted(size(250, 1000))
        ledger = publisher.stop()
        back = read_back(ledger, data_dir, proxy.url)
        log = bridge.text()
    report(export=back.export, restore=back.restore, keepalive_s=KEEPALIVE_S)
    assert_nothing_lost(back)
    assert "Traceback" not in log
