"""The search's memo of infeasible holdings: a holding that holds at least another one's, by
``search_state._holds_more``, weighs at least as much for any bytes, so pruning it is safe."""

import itertools
import random

from partitioner.cost.holding import holding
from partitioner.schedule.generators import SCHEDULES
from partitioner.solve.search_state import _holds_more


def _held(name: str, big_k: int, m: int, v: int) -> tuple[object, ...]:
    h = holding(name, big_k, m, v)
    return h.states, h.in_flight + h.rebuilt + (v,), h.splits


def test_a_holding_that_holds_more_weighs_more_for_any_bytes() -> None:
    shapes = [(name, big_k, m, 2 if name in ("zbv", "interleaved") else 1)
              for name in SCHEDULES for big_k in (2, 4) for m in (1, 2, 3, 4, 8)]
    rng = random.Random(0)
    pairs = 0
    for one, two in itertools.permutations(shapes, 2):
        if one[1] != two[1]:
            continue  # the memo compares holdings of one partition's K stages
        more, fewer = _held(*one), _held(*two)
        if not _holds_more(more, fewer):  # type: ignore[arg-type]
            continue
        pairs += 1
        h_more, h_fewer = holding(*one), holding(*two)
        for _ in range(10):
            held, held_w, rebuilt = (rng.choice([0.0, rng.uniform(0, 10)]) for _ in range(3))
            for k in range(one[1]):
                assert h_more.activation_bytes(k, held, held_w, rebuilt) >= \
                    h_fewer.activation_bytes(k, held, held_w, rebuilt), (one, two, k)
    assert pairs > 20


def test_more_micro_batches_of_one_schedule_hold_at_least_as_much() -> None:
    for name, v in (("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("zbv", 2), ("interleaved", 2)):
        a, b = _held(name, 4, 8, v), _held(name, 4, 2, v)
        assert _holds_more(a, b), name  # type: ignore[arg-type]
        assert a == b or not _holds_more(b, a), name  # type: ignore[arg-type]  (ZB-V: R at most)
