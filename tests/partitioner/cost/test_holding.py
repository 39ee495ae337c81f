"""What schedules hold: the rebuilt count against a brute-force scan, the shortcuts of the fixed
schedules against their generators' replay, the peak over the states against a byte-by-byte
replay, and which schedules split the backward."""

import random

import pytest

from partitioner.cost.holding import SPLIT_SCHEDULES, holding, peak_rebuilt, peak_states
from partitioner.schedule.generators import (
    SCHEDULES,
    counting_microbatches,
    in_flight,
    make_schedule,
    peak_in_flight,
)
from partitioner.schedule.ir import Schedule


def brute_rebuilt(sched: Schedule) -> tuple[int, ...]:
    """At every position of every row: the micro-batches of a stage past I and not yet past
    W, plus one while a B runs."""
    out = []
    for k in range(sched.stages):
        row = sched.actions[sched.rank_of[k]]
        best = 0
        for pos, a in enumerate(row):
            if a.stage != k or a.kind not in ("B", "I"):
                continue
            done = row[: pos + 1]
            live = sum(1 for i in range(sched.microbatches)
                       if any(x.kind == "I" and x.stage == k and x.microbatch == i for x in done)
                       and not any(x.kind == "W" and x.stage == k and x.microbatch == i
                                   for x in done))
            best = max(best, live + (a.kind == "B"))
        out.append(best)
    return tuple(out)


CASES = [(name, k, m, v) for name, k, v in [("gpipe", 3, 1), ("1f1b", 4, 1), ("zb-h1", 1, 1),
                                              ("zb-h1", 3, 1), ("zb-h1", 4, 1), ("zbv", 2, 2),
                                              ("zbv", 6, 2), ("interleaved", 4, 2),
                                              ("interleaved", 6, 3)]
         for m in (1, 2, 5, 8)]


@pytest.mark.parametrize("name,big_k,m,v", CASES)
def test_counts_equal_the_replay_of_the_generated_schedule(name: str, big_k: int, m: int,
                                                           v: int) -> None:
    sched = make_schedule(name, big_k, m, v)
    got = holding(name, big_k, m, v)
    assert got.rebuilt == peak_rebuilt(sched) == brute_rebuilt(sched)
    assert got.in_flight == peak_in_flight(sched) == tuple(in_flight(name, k, big_k, m, v)
                                                           for k in range(big_k))
    assert got.rank_of == sched.rank_of and got.ranks == sched.ranks
    assert got.splits == bool(sched.split) == (name in SPLIT_SCHEDULES)
    assert got.states == peak_states(sched)
    rng = random.Random(hash((name, big_k, m, v)))
    for _ in range(20):  # any bytes: the states' peak is the replayed one
        held, held_w, rebuilt = (rng.choice([0.0, 1.0, rng.uniform(0, 10)]) for _ in range(3))
        assert [got.activation_bytes(k, held, held_w, rebuilt) for k in range(big_k)] == \
            pytest.approx(brute_peak(sched, held, held_w, rebuilt))


def brute_peak(sched: Schedule, held: float, held_w: float, rebuilt: float) -> list[float]:
    """Per stage, the most bytes at once, action by action: ``held`` per micro-batch from F to
    B or I, ``held_w`` from I to W, ``rebuilt`` on top during a B or I."""
    out = []
    for k in range(sched.stages):
        live = best = 0.0
        for a in sched.actions[sched.rank_of[k]]:
            if a.stage != k:
                continue
            if a.kind == "F":
                live += held
            elif a.kind in ("B", "I"):
                best = max(best, live + rebuilt)
                live += (held_w if a.kind == "I" else 0.0) - held
            else:
                live -= held_w
            best = max(best, live)
        out.append(best)
    return out


def test_every_named_schedule_is_known_to_split_or_not() -> None:
    assert set(SCHEDULES) >= SPLIT_SCHEDULES
    for name in SCHEDULES:
        sched = make_schedule(name, 4, 4, 2 if name in ("zbv", "interleaved") else 1)
        kinds = {a.kind for row in sched.actions for a in row}
        assert kinds == ({"F", "I", "W"} if name in SPLIT_SCHEDULES else {"F", "B"})


def test_zb_h1_closed_forms_equal_the_replay_of_its_schedule() -> None:
    for big_k in range(1, 13):
        for m in range(1, 31):
            sched = make_schedule("zb-h1", big_k, m)
            got = holding("zb-h1", big_k, m)
            assert got.in_flight == peak_in_flight(sched), (big_k, m)
            assert got.rebuilt == peak_rebuilt(sched), (big_k, m)
            assert got.states == peak_states(sched), (big_k, m)


PERIODIC = ([("interleaved", r * v, v, m) for r in (2, 3, 5) for v in (2, 3, 4)
             for m in range(2 * r + 1, 6 * r * v + 13)]
            + [("zbv", 2 * r, 2, m) for r in (2, 3, 4, 7) for m in range(2 * r + 1, 8 * r + 13)]
            + [("interleaved", 40, 2, 97), ("interleaved", 32, 4, 130), ("zbv", 40, 2, 150),
               ("interleaved", 64, 2, 97), ("interleaved", 64, 4, 37)])


@pytest.mark.parametrize("name,big_k,v,m", PERIODIC)
def test_periodic_schedules_are_counted_on_a_shorter_one(name: str, big_k: int, v: int,
                                                         m: int) -> None:
    """Interleaved and ZB-V are counted on 2R micro-batches at most: the same counts as the
    replay of the whole schedule."""
    assert counting_microbatches(name, big_k, m, v) < m
    sched = make_schedule(name, big_k, m, v)
    got = holding(name, big_k, m, v)
    assert got.states == peak_states(sched)
    assert got.in_flight == peak_in_flight(sched) == tuple(in_flight(name, k, big_k, m, v)
                                                           for k in range(big_k))
    assert got.rebuilt == peak_rebuilt(sched)


@pytest.mark.parametrize("ranks,m", [(r, m) for r in range(1, 11) for m in range(r, 3 * r + 3)]
                         + [(16, 16), (16, 37), (32, 32), (32, 64)])
def test_zbv_closed_forms_equal_the_replay(ranks: int, m: int) -> None:
    sched = make_schedule("zbv", 2 * ranks, m, 2)
    got = holding("zbv", 2 * ranks, m, 2)
    assert got.states == peak_states(sched) and got.rank_of == sched.rank_of
    assert got.in_flight == peak_in_flight(sched) and got.rebuilt == peak_rebuilt(sched)


def test_the_states_kept_are_those_no_other_state_reaches_in_every_count() -> None:
    """``_frontier``'s sweep against the definition, on random sets of (a, b, t) counts."""
    from partitioner.cost.holding import _frontier

    rng = random.Random(7)
    for _ in range(3000):
        hi = rng.randint(0, 6)
        found = {(rng.randint(0, hi), rng.randint(0, hi), rng.randint(0, 1))
                 for _ in range(rng.randint(1, 25))}
        expected = sorted(s for s in found if not any(
            o != s and all(x >= y for x, y in zip(o, s, strict=True)) for o in found))
        assert list(_frontier(found)) == expected, found
