"""Keys and placement: key order is time order, ranges are exact, rendezvous placement is stable."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import cache
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_backup import keys, placement
from mqtt_backup.placement import Weighted, place
from tests.conftest import examples

FLEET = 20_000

device_ids = st.text(st.characters(codec="utf-8"), max_size=30)
timestamps = st.integers(0, 2**64 - 1)
sequences = st.integers(0, keys.SEQ_MASK)


@cache
def fleet_keys() -> tuple[bytes, ...]:
    """Device keys of a fixed fleet, computed once for the whole module."""
    return tuple(keys.device_key(f"device-{i}") for i in range(FLEET))


def parts(n: int, weight: float = 1.0) -> list[Weighted]:
    return [Weighted(f"p{i}", weight) for i in range(n)]


def placements(partitions: Sequence[Weighted]) -> list[str]:
    return [place(k, partitions) for k in fleet_keys()]


# --- keys -------------------------------------------------------------------------------------


@settings(max_examples=examples(200), deadline=None)
@given(
    device=device_ids,
    stamps=st.lists(st.tuples(timestamps, sequences), unique=True, max_size=50),
)
def test_key_order_is_time_order(device: str, stamps: list[tuple[int, int]]) -> None:
    dev_key = keys.device_key(device)
    by_key = sorted(keys.record_key(dev_key, ts, seq) for ts, seq in stamps)
    by_time = [keys.record_key(dev_key, ts, seq) for ts, seq in sorted(stamps)]
    assert by_key == by_time


@settings(max_examples=examples(200), deadline=None)
@given(device=device_ids, ts_ns=timestamps, seq=st.integers(0, 2**40))
def test_split_key_inverts_record_key(device: str, ts_ns: int, seq: int) -> None:
    dev_key = keys.device_key(device)
    key = keys.record_key(dev_key, ts_ns, seq)
    assert len(key) == keys.KEY_LEN
    assert keys.split_key(key) == (dev_key, ts_ns, seq % 2**32)


def test_sequence_wraps_to_32_bits() -> None:
    dev_key = keys.device_key("d")
    assert keys.record_key(dev_key, 5, 2**32 + 5) == keys.record_key(dev_key, 5, 5)
    assert keys.record_key(dev_key, 5, 2**32 - 1).endswith(b"\xff\xff\xff\xff")


def test_device_key_is_16_bytes_of_murmur3() -> None:
    assert len(keys.device_key("anything")) == keys.DEVICE_KEY_LEN
    assert keys.device_key("Gerät") != keys.device_key("Gera\u0308t")  # bytes, not normalised
    assert keys.device_key("") == bytes(16)  # mmh3 x64 128 of nothing, seed 0


bounds = st.none() | timestamps


@settings(max_examples=examples(300), deadline=None)
@given(
    device=device_ids,
    other=device_ids,
    stamps=st.lists(st.tuples(timestamps, sequences), max_size=30),
    since=bounds,
    until=bounds,
    data=st.data(),
)
def test_device_range_is_exactly_since_until(
    device: str,
    other: str,
    stamps: list[tuple[int, int]],
    since: int | None,
    until: int | None,
    data: st.DataObject,
) -> None:
    # Make the bounds hit stored timestamps (and their neighbours) often.
    near_stamps = data.draw(st.booleans(), label="bounds near stamps")
    if stamps and near_stamps:
        pick = st.sampled_from([ts + d for ts, _ in stamps for d in (-1, 0, 1) if ts + d >= 0])
        since = data.draw(st.none() | pick.filter(lambda t: t < 2**64), label="since")
        until = data.draw(st.none() | pick.filter(lambda t: t < 2**64), label="until")
    dev_key = keys.device_key(device)
    lower, upper = keys.device_range(dev_key, since, until)
    low = 0 if since is None else since
    for ts, seq in stamps:
        key = keys.record_key(dev_key, ts, seq)
        inside = low <= ts and (until is None or ts < until)
        assert (lower <= key < upper) == inside, (ts, seq, since, until)
    other_key = keys.device_key(other)
    if other_key != dev_key:
        for ts, seq in stamps:
            assert not lower <= keys.record_key(other_key, ts, seq) < upper


def test_device_range_extremes() -> None:
    dev_key = keys.device_key("d")
    lower, upper = keys.device_range(dev_key)
    first = keys.record_key(dev_key, 0, 0)
    last = keys.record_key(dev_key, 2**64 - 1, keys.SEQ_MASK)
    assert lower <= first < upper
    assert lower <= last < upper
    lower, upper = keys.device_range(dev_key, 10, 10)
    assert not lower <= keys.record_key(dev_key, 10, 0) < upper  # empty range
    lower, upper = keys.device_range(dev_key, None, 2**64 - 1)
    assert not lower <= last < upper
    assert lower <= keys.record_key(dev_key, 2**64 - 2, keys.SEQ_MASK) < upper


# --- placement: stability ------------------------------------------------------------------------

partition_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)
weights = st.floats(0.05, 20.0)
partition_sets = st.lists(
    st.builds(Weighted, partition_names, weights),
    min_size=1,
    max_size=10,
    unique_by=lambda p: p.name,
)


@settings(max_examples=examples(200), deadline=None)
@given(device=device_ids, partitions=partition_sets, data=st.data())
def test_placement_ignores_partition_order(
    device: str, partitions: list[Weighted], data: st.DataObject
) -> None:
    dev_key = keys.device_key(device)
    shuffled = data.draw(st.permutations(partitions), label="shuffled")
    assert place(dev_key, shuffled) == place(dev_key, partitions)
    assert place(dev_key, partitions) in {p.name for p in partitions}


@settings(max_examples=examples(100), deadline=None)
@given(
    partitions=partition_sets,
    new=st.builds(Weighted, partition_names, weights),
    first=st.integers(0, FLEET - 300),
)
def test_adding_a_partition_moves_devices_only_onto_it(
    partitions: list[Weighted], new: Weighted, first: int
) -> None:
    taken = {p.name for p in partitions}
    while new.name in taken:
        new = Weighted(new.name + "\u2603", new.weight)
    grown = [*partitions, new]
    for dev_key in fleet_keys()[first : first + 300]:
        before, after = place(dev_key, partitions), place(dev_key, grown)
        assert after in {before, new.name}


@settings(max_examples=examples(100), deadline=None)
@given(partitions=partition_sets, data=st.data(), first=st.integers(0, FLEET - 300))
def test_removing_a_partition_moves_only_its_devices(
    partitions: list[Weighted], data: st.DataObject, first: int
) -> None:
    if len(partitions) < 2:
        partitions = [*partitions, Weighted(partitions[0].name + "x")]
    gone = data.draw(st.sampled_from(partitions), label="removed")
    shrunk = [p for p in partitions if p is not gone]
    for dev_key in fleet_keys()[first : first + 300]:
        before, after = place(dev_key, partitions), place(dev_key, shrunk)
        if before != gone.name:
            assert after == before
        else:
            assert after != gone.name


@settings(max_examples=examples(50), deadline=None)
@given(partitions=partition_sets, data=st.data(), first=st.integers(0, FLEET - 300))
def test_reweighting_one_partition_moves_devices_only_to_or_from_it(
    partitions: list[Weighted], data: st.DataObject, first: int
) -> None:
    changed = data.draw(st.sampled_from(partitions), label="changed")
    factor = data.draw(st.sampled_from([0.25, 0.5, 2.0, 4.0]), label="factor")
    reweighted = [Weighted(p.name, p.weight * factor) if p is changed else p for p in partitions]
    for dev_key in fleet_keys()[first : first + 300]:
        before, after = place(dev_key, partitions), place(dev_key, reweighted)
        if before != after:
            assert changed.name in {before, after}
            # Heavier only attracts, lighter only releases.
            assert (after == changed.name) == (factor > 1)


@pytest.mark.parametrize("n", [3, 4, 8])
def test_adding_the_next_partition_moves_about_its_share(n: int) -> None:
    before = placements(parts(n))
    after = placements(parts(n + 1))
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == f"p{n}" for _, a in moved), "devices moved between old partitions"
    expected = FLEET / (n + 1)
    assert abs(len(moved) - expected) <= 0.10 * expected, (len(moved), expected)
    # The newcomer takes its share from every old partition, not from one.
    taken_from = Counter(b for b, _ in moved)
    assert set(taken_from) == {f"p{i}" for i in range(n)}
    for count in taken_from.values():
        assert abs(count - expected / n) <= 0.25 * expected / n


@pytest.mark.parametrize("n", [3, 8])
def test_removing_a_partition_spreads_only_its_devices(n: int) -> None:
    before = placements(parts(n))
    without = [p for p in parts(n) if p.name != "p1"]
    after = placements(without)
    for b, a in zip(before, after, strict=True):
        assert a == b if b != "p1" else a != "p1"
    spread = Counter(a for b, a in zip(before, after, strict=True) if b == "p1")
    assert set(spread) == {p.name for p in without}


@pytest.mark.parametrize("n", [1, 3, 8, 64])
def test_equal_weights_balance(n: int) -> None:
    counts = Counter(placements(parts(n)))
    expected = FLEET / n
    assert set(counts) == {f"p{i}" for i in range(n)}
    for count in counts.values():
        assert abs(count - expected) <= 0.2 * expected + 15, counts


@pytest.mark.parametrize(
    "weighted",
    [
        [("p0", 1.0), ("p1", 2.0), ("p2", 0.5)],
        [("a", 3.0), ("b", 1.0)],
        [("p0", 10.0), ("p1", 10.0), ("p2", 10.0), ("p3", 30.0)],
    ],
)
def test_weights_bias_placement_proportionally(weighted: list[tuple[str, float]]) -> None:
    counts = Counter(placements([Weighted(name, w) for name, w in weighted]))
    total = sum(w for _, w in weighted)
    for name, w in weighted:
        expected = FLEET * w / total
        assert abs(counts[name] - expected) <= 0.10 * expected, (name, counts, expected)


def test_scaling_all_weights_changes_nothing() -> None:
    one = [Weighted("p0", 1.0), Weighted("p1", 2.0), Weighted("p2", 0.5)]
    scaled = [Weighted(p.name, p.weight * 8) for p in one]
    sample = fleet_keys()[:2000]
    assert [place(k, one) for k in sample] == [place(k, scaled) for k in sample]


def test_single_partition_takes_everything() -> None:
    assert set(placements([Weighted("only", 0.01)])) == {"only"}


def test_no_partitions_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one partition"):
        place(keys.device_key("d"), [])


# --- placement: ties and the edge of the formula --------------------------------------------


@pytest.mark.parametrize(
    "names",
    [["p0", "p1"], ["p1", "p0"], ["p2", "p10", "p1"], ["b", "a", "c"], ["zz", "z", "Z"]],
)
@pytest.mark.parametrize("value", [0.0, 1.0, 123.5, math.inf])
def test_equal_scores_go_to_the_smaller_name(
    monkeypatch: pytest.MonkeyPatch, names: list[str], value: float
) -> None:
    def constant(dev_key: bytes, name: str, weight: float) -> float:
        del dev_key, name, weight
        return value

    monkeypatch.setattr(placement, "score", constant)
    assert place(b"\x00" * 16, [Weighted(n) for n in names]) == min(names)


def test_a_tie_below_the_best_does_not_win(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {"a": 1.0, "b": 5.0, "c": 5.0, "d": 9.0, "e": 9.0}

    def by_name(dev_key: bytes, name: str, weight: float) -> float:
        del dev_key, weight
        return table[name]

    monkeypatch.setattr(placement, "score", by_name)
    for order in (list(table), list(reversed(table)), ["b", "e", "a", "d", "c"]):
        assert place(b"k" * 16, [Weighted(n) for n in order]) == "d"


class _FixedHash:
    """Stands in for mmh3 in `placement`, returning one chosen 64-bit hash."""

    def __init__(self, h: int) -> None:
        self.h = h

    def hash64(self, key: bytes, *, signed: bool) -> tuple[int, int]:
        assert not signed
        assert key
        return self.h, 0


def _score_with_hash(monkeypatch: pytest.MonkeyPatch, h: int, weight: float = 1.0) -> float:
    monkeypatch.setattr(placement, "mmh3", SimpleNamespace(hash64=_FixedHash(h).hash64))
    return placement.score(b"\x01" * 16, "p0", weight)


@pytest.mark.parametrize("h", [2**64 - 1, 2**64 - 2**10])
def test_hash_at_the_top_scores_infinity(monkeypatch: pytest.MonkeyPatch, h: int) -> None:
    # (h + 0.5) / 2**64 rounds to 1.0 in floating point: ln(u) would be 0, the limit is +inf.
    assert (h + 0.5) / 2**64 >= 1.0
    assert _score_with_hash(monkeypatch, h) == math.inf


def test_hash_just_below_the_top_scores_finite(monkeypatch: pytest.MonkeyPatch) -> None:
    h = 2**64 - 2**12
    assert (h + 0.5) / 2**64 < 1.0
    s = _score_with_hash(monkeypatch, h)
    assert math.isfinite(s)
    assert s > 1e15


def test_hash_zero_scores_small_and_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _score_with_hash(monkeypatch, 0)
    assert 0 < s < 0.03  # -1 / ln(0.5 / 2**64)
    assert math.isclose(s, -1 / math.log(0.5 / 2**64))


def test_score_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    h = 2**63
    assert math.isclose(_score_with_hash(monkeypatch, h, 3.0), -3.0 / math.log((h + 0.5) / 2**64))


def test_score_uses_device_key_then_name(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []

    def record(key: bytes, *, signed: bool) -> tuple[int, int]:
        assert not signed
        seen.append(key)
        return 2**62, 0

    monkeypatch.setattr(placement, "mmh3", SimpleNamespace(hash64=record))
    placement.score(b"\x02" * 16, "pé", 1.0)
    assert seen == [b"\x02" * 16 + "pé".encode()]


def test_infinite_score_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    def top_for_p7(dev_key: bytes, name: str, weight: float) -> float:
        del dev_key, weight
        return math.inf if name == "p7" else 1e300

    monkeypatch.setattr(placement, "score", top_for_p7)
    assert place(b"\x00" * 16, parts(8)) == "p7"


# --- Placement: the fast form the store uses, held to `place` ----------------------------------


@settings(max_examples=examples(300), deadline=None)
@given(device=device_ids, partitions=partition_sets)
def test_placement_object_places_as_place_does(device: str, partitions: list[Weighted]) -> None:
    dev_key = keys.device_key(device)
    assert placement.Placement(partitions)(dev_key) == place(dev_key, partitions)


@pytest.mark.parametrize("weighted", [parts(4), parts(7, 2.5), [Weighted("a", 3.0), Weighted("b")]])
def test_placement_object_places_a_fleet_as_place_does(weighted: list[Weighted]) -> None:
    placer = placement.Placement(weighted)
    assert [placer(k) for k in fleet_keys()] == placements(weighted)


@pytest.mark.parametrize("h", [0, 2**62, 2**64 - 2**12, 2**64 - 1])
@pytest.mark.parametrize("names", [["p0", "p1"], ["p2", "p10", "p1"], ["zz", "z", "Z"]])
def test_placement_object_breaks_ties_and_infinities_as_place_does(
    monkeypatch: pytest.MonkeyPatch, h: int, names: list[str]
) -> None:
    # Every partition hashes alike: equal scores (infinite ones at the top), the smaller name wins.
    def digest(key: bytes, seed: int) -> tuple[int, int]:
        assert key
        assert seed == 0
        return h, 0

    monkeypatch.setattr(placement, "_digest", digest)
    monkeypatch.setattr(placement, "mmh3", SimpleNamespace(hash64=_FixedHash(h).hash64))
    weighted = [Weighted(n) for n in names]
    assert placement.Placement(weighted)(b"\x00" * 16) == place(b"\x00" * 16, weighted)
    assert place(b"\x00" * 16, weighted) == min(names)


def test_placement_object_without_partitions_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one partition"):
        placement.Placement([])(keys.device_key("d"))


# --- Placement with one partition: no hash, the same answer -------------------------------------


@settings(max_examples=examples(300), deadline=None)
@given(
    device=device_ids,
    name=st.text(min_size=1, max_size=12),
    weight=st.floats(min_value=0.0) | st.floats(min_value=1e-300, max_value=1e300),
)
def test_placement_object_with_one_partition_places_as_place_does(
    device: str, name: str, weight: float
) -> None:
    # Any weight >= 0, zero and +inf included, though a manifest allows only positive finite
    # ones: the score is >= 0 (or +inf), so it beats `place`'s start of -inf. The shortcut is
    # `place`'s answer, not an approximation of it. (A negative weight could score -inf.)
    dev_key = keys.device_key(device)
    only = [Weighted(name, weight)]
    assert placement.Placement(only)(dev_key) == place(dev_key, only) == name


@pytest.mark.parametrize("h", [0, 2**62, 2**64 - 2**12, 2**64 - 1])
def test_placement_object_with_one_partition_never_hashes(
    monkeypatch: pytest.MonkeyPatch, h: int
) -> None:
    # `place` hashes and scores it (an infinite score at the top included); Placement does not.
    hashed: list[bytes] = []

    def digest(key: bytes, seed: int) -> tuple[int, int]:
        hashed.append(key)
        return h, seed

    monkeypatch.setattr(placement, "_digest", digest)
    monkeypatch.setattr(placement, "mmh3", SimpleNamespace(hash64=_FixedHash(h).hash64))
    only = [Weighted("p0", 0.25)]
    placer = placement.Placement(only)
    assert [placer(k) for k in fleet_keys()[:100]] == ["p0"] * 100
    assert hashed == []
    assert place(b"\x00" * 16, only) == "p0"
