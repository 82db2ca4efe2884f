"""The bridge process dies, stops or stays away while devices publish: nothing accepted is lost."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import Broker
from tests.faults.conftest import Report
from tests.faults.harness import (
    RATE,
    Publisher,
    ReadBack,
    assert_nothing_lost,
    bridge_process,
    fleet,
    read_back,
    size,
)

pytestmark = pytest.mark.slow


def test_kill_9_during_a_continuous_publish(
    own_broker: Broker, data_dir: Path, unique: str, tmp_path: Path, report: Report
) -> None:
    """kill -9 of the bridge during a continuous publish"""
    kills, between = size(3, 20), size(250, 1000)
    rng = random.Random(unique)
    with bridge_process(own_broker.url, data_dir, tmp_path / "bridge.log") as bridge:
        bridge.start()
        publisher = Publisher(own_broker.port, fleet(unique, 4), rate=RATE).start()
        for _ in range(kills):
            publisher.wait_accepted(rng.randint(between // 2, between))
            bridge.kill()
            bridge.start()
        publisher.wait_accepted(between)
        ledger = publisher.stop()
        back = read_back(ledger, data_dir, own_broker.url)
    report(kills=kills, export=back.export, restore=back.restore, publish_errors=publisher.errors)
    assert_nothing_lost(back)


def _stop_under_load(
    url: str, port: int, data: Path, devices: list[str], tmp_path: Path, stops: int
) -> tuple[list[int], str, ReadBack]:
    codes = []
    with bridge_process(url, data, tmp_path / "bridge.log") as bridge:
        bridge.start()
        publisher = Publisher(port, devices, rate=RATE).start()
        for _ in range(stops):
            publisher.wait_accepted(size(250, 1000))
            codes.append(bridge.terminate())
            bridge.start()
        publisher.wait_accepted(size(250, 1000))
        ledger = publisher.stop()
        back = read_back(ledger, data, url)
        return codes, bridge.text(), back


@pytest.mark.usefixtures("transport")  # the goodbye is the transport's: both
def test_sigterm_under_load(
    own_broker: Broker, data_dir: Path, unique: str, tmp_path: Path, report: Report
) -> None:
    """SIGTERM of the bridge under load"""
    stops = size(3, 10)
    codes, log, back = _stop_under_load(
        own_broker.url, own_broker.port, data_dir, fleet(unique, 4), tmp_path, stops
    )
    report(stops=stops, export=back.export, restore=back.restore, exit_codes=sorted(set(codes)))
    assert codes == [0] * stops, log
    assert "Traceback" not in log
    assert_nothing_lost(back)
    # A clean stop stores and acknowledges what it read, then lets the broker close: nothing is
    # sent again. Closing with unread data resets the connection and the broker discards the
    # acknowledgements it had not read yet (its log: "disconnected: Broken pipe").
    assert back.export.extra_copies == 0, "a clean stop left acknowledgements unsent"


def test_bridge_down_longer_than_a_publish_burst(
    own_broker: Broker, data_dir: Path, unique: str, tmp_path: Path, report: Report
) -> None:
    """Bridge down longer than a publish burst"""
    burst = size(2000, 20_000)
    with bridge_process(own_broker.url, data_dir, tmp_path / "bridge.log") as bridge:
        bridge.start()
        assert bridge.terminate() == 0  # the session and its subscription exist now
        ledger = Publisher(own_broker.port, fleet(unique, 8), limit=burst).start().wait_done()
        assert ledger.total == burst
        bridge.start()
        back = read_back(ledger, data_dir, own_broker.url)
    report(burst=burst, export=back.export, restore=back.restore)
    assert_nothing_lost(back)
    assert back.export.extra_copies == 0, "the queue arrives once"
