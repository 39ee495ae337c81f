"""The list scheduler's incremental replay against the plain one (its oracle)."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partitioner.schedule.generators import v_placement
from partitioner.schedule.listsched import Costs, replay
from tests.partitioner.schedule.listsched_reference import reference_rows


def _costs(rng: random.Random, stages: int, split: bool, unit: bool) -> Costs:
    def draw() -> tuple[float, ...]:  # small integers: ties between stages are common
        return tuple(1.0 if unit else float(rng.randint(0, 4)) for _ in range(stages))
    return Costs(draw(), draw(), draw(), draw(), draw(), split)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 4), st.integers(1, 7), st.booleans(),
       st.booleans(), st.sampled_from(["chain", "v", "interleaved"]),
       st.sampled_from(["IFW", "FIW", "WFI"]), st.booleans())
def test_replay_equals_the_plain_replay(seed: int, ranks: int, m: int, split: bool,
                                        unit: bool, shape: str, priority: str,
                                        deep: bool) -> None:
    rng = random.Random(seed)
    placement = {"chain": tuple(range(ranks)), "v": v_placement(ranks),
                 "interleaved": tuple(k % ranks for k in range(2 * ranks))}[shape]
    costs = _costs(rng, len(placement), split, unit)
    caps = tuple(rng.randint(1, m + 1) for _ in placement)
    sched, step, _ = replay(costs, placement, m, caps, priority=priority, deep_inputs_first=deep)
    rows, want = reference_rows(costs, placement, m, caps, priority, deep)
    assert [list(r) for r in sched.actions] == rows
    assert step == want


def test_replay_is_the_same_on_a_large_v() -> None:
    """ZB-V's shape at R = 8, M = 32 (the size the search meets), unit times and measured-like."""
    rng = random.Random(7)
    placement = v_placement(8)
    for costs in (Costs.uniform(16), _costs(rng, 16, True, False)):
        sched, step, _ = replay(costs, placement, 32, (8,) * 16, priority="FIW")
        rows, want = reference_rows(costs, placement, 32, (8,) * 16, "FIW")
        assert [list(r) for r in sched.actions] == rows
        assert step == pytest.approx(want, rel=0)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 4), st.integers(1, 7),
       st.sampled_from(["chain", "v", "interleaved"]), st.sampled_from(["IFW", "FIW"]))
def test_caps_in_the_reported_range_make_the_same_replay(seed: int, ranks: int, m: int,
                                                         shape: str, priority: str) -> None:
    rng = random.Random(seed)
    placement = {"chain": tuple(range(ranks)), "v": v_placement(ranks),
                 "interleaved": tuple(k % ranks for k in range(2 * ranks))}[shape]
    costs = _costs(rng, len(placement), True, rng.random() < 0.3)
    caps = tuple(rng.randint(1, m + 1) for _ in placement)
    got = replay(costs, placement, m, caps, priority=priority)
    assert all(lo <= c <= hi for c, (lo, hi) in zip(caps, got.same_caps, strict=True))
    for _ in range(4):
        other = tuple(rng.randint(lo, hi) for lo, hi in got.same_caps)
        again = replay(costs, placement, m, other, priority=priority)
        assert again.schedule.actions == got.schedule.actions and again.step == got.step
    # a cap outside its range changes what some test said: not always the schedule, but the
    # range then moves with it
    k = rng.randrange(len(caps))
    hi = got.same_caps[k][1]
    if hi <= m:
        bigger = replay(costs, placement, m, (*caps[:k], hi + 1, *caps[k + 1:]), priority=priority)
        assert bigger.same_caps[k][0] > hi
