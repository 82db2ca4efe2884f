"""The test brokers start on a port of their own, even when another process takes the one chosen.

`free_port` binds port 0 and closes it: between that and mosquitto's bind, another pytest-xdist
worker (or anything else) may take the same port. A listener there is not ours.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Broker
from tools import devbroker


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another process listens on (here: this one, as another worker's broker would)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_mosquitto_on_a_taken_port_is_refused_not_mistaken_for_ours(
    taken: int, tmp_path: Path
) -> None:
    with pytest.raises(devbroker.PortTaken, match=f"port {taken} is taken"):
        devbroker.start("dev.conf", taken, tmp_path / "broker")


def test_a_broker_whose_port_was_taken_starts_on_another(taken: int, tmp_path: Path) -> None:
    broker = Broker("dev.conf", tmp_path / "broker", port=taken)
    broker.start()
    try:
        assert broker.port != taken
        assert broker.proc is not None
        assert devbroker.listens(broker.proc.pid, broker.port)
        assert not devbroker.listens(broker.proc.pid, taken)
    finally:
        broker.stop()


def test_a_restart_keeps_its_port_and_says_when_it_is_taken(tmp_path: Path) -> None:
    broker = Broker("dev.conf", tmp_path / "broker")
    broker.start()
    port = broker.port
    broker.stop()
    broker.start()
    assert broker.port == port, "the bridge under test reconnects to the same port"
    broker.stop()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        with pytest.raises(devbroker.PortTaken):
            broker.start()
    assert broker.port == port
