"""Weighted rendezvous (highest-random-weight) placement of devices on partitions.

An on-disk contract, pinned by golden vectors: changing it orphans stored data.
For each partition (name, weight): h = mmh3.hash64(device_key + name, unsigned)[0],
u = (h + 0.5) / 2**64, score = -weight / ln(u). The highest score wins; ties go to the smaller name.
Adding a partition moves only the devices it wins; removing one moves only its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import mmh3

_TWO_64 = float(2**64)


@dataclass(frozen=True, slots=True)
class Weighted:
    """A partition as placement sees it: a name and a positive weight."""

    name: str
    weight: float = 1.0


def score(dev_key: bytes, name: str, weight: float) -> float:
    """The rendezvous score of one partition for one device."""
    h = mmh3.hash64(dev_key + name.encode("utf-8"), signed=False)[0]
    u = (h + 0.5) / _TWO_64
    if u >= 1.0:
        # h within 2**10 of 2**64 rounds u to 1.0 in floating point: the formula's limit is +inf.
        return math.inf
    return -weight / math.log(u)


def place(dev_key: bytes, partitions: Sequence[Weighted]) -> str:
    """Name of the partition that holds the device with this key."""
    if not partitions:
        raise ValueError("placement needs at least one partition")
    best_name = ""
    best_score = -math.inf
    for part in partitions:
        s = score(dev_key, part.name, part.weight)
        if s > best_score or (s == best_score and part.name < best_name):
            best_name, best_score = part.name, s
    return best_name
