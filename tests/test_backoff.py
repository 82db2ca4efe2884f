"""The one backoff of every retry loop (reconnects, storage stalls)."""

from __future__ import annotations

import pytest

from mqtt_backup.mqtt import backoff
from mqtt_backup.mqtt.backoff import Backoff


def test_delays_double_up_to_the_cap_each_within_the_jitter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backoff, "MAX_S", 30.0)  # as shipped (the autouse fixture lowers it)
    steps = Backoff()
    bases = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    for base in bases:
        delay = steps.next()
        assert base * (1 - backoff.JITTER) <= delay <= base * (1 + backoff.JITTER)


def test_reset_starts_again_at_the_first_delay() -> None:
    steps = Backoff()
    for _ in range(5):
        steps.next()
    steps.reset()
    assert steps.next() <= backoff.FIRST_S * (1 + backoff.JITTER)


def test_the_cap_is_read_at_each_step(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = Backoff()
    steps.next()
    monkeypatch.setattr(backoff, "MAX_S", 0.5)  # what tests/conftest.py does
    assert all(steps.next() <= 0.5 * (1 + backoff.JITTER) for _ in range(5))


def test_jitter_spreads_bridges_that_retry_together() -> None:
    assert len({Backoff().next() for _ in range(20)}) > 1
