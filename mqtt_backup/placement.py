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
_INF = math.inf
_log = math.log
_digest = mmh3.mmh3_x64_128_utupledigest


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
    """Name of the partition that holds the device with this key (the reference: see Placement)."""
    if not partitions:
        raise ValueError("placement needs at least one partition")
    best_name = ""
    best_score = -math.inf
    for part in partitions:
        s = score(dev_key, part.name, part.weight)
        if s > best_score or (s == best_score and part.name < best_name):
            best_name, best_score = part.name, s
    return best_name


class Placement:
    """`place` over one set of partitions, for many devices: `Placement(partitions)(dev_key)`.

    The same arithmetic as `score`, in one loop over the partitions' names encoded once: a new
    device costs one placement on the ingest path (a fleet larger than the caches, every
    message), and per-partition calls of `score` made it ~5 us at 4 partitions (now ~2.5 us).
    tests/test_placement.py holds it to `place` over random keys and weights, ties included.
    """

    __slots__ = ("_only", "_table")

    def __init__(self, partitions: Sequence[Weighted]) -> None:
        self._table = tuple((p.name, p.name.encode("utf-8"), p.weight) for p in partitions)
        # One partition (a new data directory's default) wins every device, whatever its weight:
        # its score is the only one, and for any weight >= 0 it is >= 0 or +inf, so it beats
        # `place`'s start of -inf (a manifest's weights are positive and finite). So no hash:
        # ~1 us less per new device (tests/test_placement.py; the golden one-partition set).
        self._only = partitions[0].name if len(partitions) == 1 else None

    def __call__(self, dev_key: bytes) -> str:
        """Name of the partition that holds the device with this key."""
        only = self._only
        if only is not None:
            return only
        table = self._table
        if not table:
            raise ValueError("placement needs at least one partition")
        best_name = ""
        best_score = -_INF
        for name, suffix, weight in table:
            # = score(dev_key, name, weight); mmh3's unsigned tuple digest is hash64(signed=False)
            u = (_digest(dev_key + suffix, 0)[0] + 0.5) / _TWO_64
            s = _INF if u >= 1.0 else -weight / _log(u)
            if s > best_score or (s == best_score and name < best_name):
                best_name, best_score = name, s
        return best_name
