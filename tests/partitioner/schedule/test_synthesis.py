"""Synthesised schedules: valid, within memory, never worse than the fixed ones, better on
unequal stages."""

import random

import pytest

from partitioner.schedule.generators import (
    gpipe,
    one_f_one_b,
    peak_in_flight,
    v_placement,
    zb_h1,
    zbv,
)
from partitioner.schedule.ir import Schedule, lower, validate
from partitioner.schedule.listsched import Costs, timed
from partitioner.schedule.synthesis import synthesise


def _costs(rng: random.Random, k: int, comm: float = 0.1) -> Costs:
    fwd = tuple(rng.uniform(0.5, 2.0) for _ in range(k))
    return Costs(fwd, tuple(f * rng.uniform(0.8, 1.2) for f in fwd),
                 tuple(f * rng.uniform(0.6, 1.0) for f in fwd), (comm,) * k, (comm,) * k)


def _fixed(k: int, m: int) -> list[Schedule]:
    return [gpipe(k, m), one_f_one_b(k, m), zb_h1(k, m)]


def _time(costs: Costs, sched: Schedule) -> float:
    # a fixed schedule with full backwards B = I + W is timed by the same rules
    return timed(costs, sched)


@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_the_best_fixed_schedule(seed: int) -> None:
    rng = random.Random(seed)
    k, m = rng.choice([(2, 4), (3, 6), (4, 8), (4, 5)])
    costs = _costs(rng, k)
    fixed = _fixed(k, m)
    found = synthesise(costs, tuple(range(k)), m, baselines=fixed)
    validate(lower(validate(found.schedule)))
    assert found.step_ms <= min(_time(costs, s) for s in fixed) + 1e-9
    assert found.step_ms == pytest.approx(_time(costs, found.schedule))


def test_beats_each_fixed_schedule_under_its_memory_on_unequal_stages() -> None:
    # stages that get faster down the pipeline: the fixed orders wait where the list
    # scheduler fills; each comparison allows exactly the fixed schedule's own per-stage peak
    costs = Costs((2.5, 2.0, 1.5, 1.0), (2.5, 2.0, 1.5, 1.0), (2.0, 1.5, 1.0, 0.5), (0.2,) * 4,
                  (0.2,) * 4)
    k, m = 4, 8
    for fixed in _fixed(k, m):
        limit = peak_in_flight(fixed)
        found = synthesise(costs, tuple(range(k)), m, baselines=[fixed],
                           fits=lambda s, limit=limit: all(
                               p <= q for p, q in zip(peak_in_flight(s), limit, strict=True)))
        assert found.step_ms < _time(costs, fixed), fixed.name
        assert all(p <= q for p, q in zip(peak_in_flight(found.schedule), limit, strict=True))


def test_v_placement_is_searched_too() -> None:
    r, m = 2, 4
    costs = Costs.uniform(2 * r)
    found = synthesise(costs, v_placement(r), m, baselines=[zbv(r, m)])
    assert found.schedule.placement == v_placement(r)
    assert found.step_ms <= timed(costs, zbv(r, m))


def test_memory_that_fits_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="fits"):
        synthesise(Costs.uniform(2), (0, 1), 4, fits=lambda s: False)


def test_full_backwards_when_the_costs_do_not_split() -> None:
    costs = Costs.uniform(3, split=False)
    found = synthesise(costs, (0, 1, 2), 5, fits=lambda s: max(peak_in_flight(s)) <= 2)
    kinds = {a.kind for row in found.schedule.actions for a in row}
    assert kinds == {"F", "B"} and max(peak_in_flight(found.schedule)) <= 2
