"""The schedules beyond 1F1B against literal lists, their validity, placement and memory."""

import pytest

from partitioner.schedule.generators import (
    in_flight,
    interleaved_1f1b,
    make_schedule,
    one_f_one_b,
    peak_in_flight,
    v_placement,
    zb_h1,
    zbv,
)
from partitioner.schedule.ir import Schedule, lower, validate
from partitioner.schedule.listsched import Costs, list_schedule


def test_interleaved_lists_follow_megatron_order() -> None:
    # R=2 ranks, V=2: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3; rank 0 warms up
    # with 2(R-1) + (V-1)R = 4 forwards, rank 1 with 2
    sched = interleaved_1f1b(2, 2, 4)
    assert sched.placement == (0, 1, 0, 1)
    assert str(sched) == (
        "0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3\n"
        "1: 1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3")


def test_zb_h1_lists() -> None:
    # warm-up K-k forwards; then I, W, F; the last K micro-batches' W wait for the drain
    assert str(zb_h1(3, 4)) == (
        "0: 0F0 0F1 0F2 0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3\n"
        "1: 1F0 1F1 1I0 1W0 1F2 1I1 1F3 1I2 1W1 1I3 1W2 1W3\n"
        "2: 2F0 2I0 2W0 2F1 2I1 2F2 2I2 2F3 2I3 2W1 2W2 2W3")


def test_zbv_places_stages_in_a_v() -> None:
    assert v_placement(2) == (0, 1, 1, 0)
    sched = zbv(2, 2)
    assert sched.placement == (0, 1, 1, 0) and sched.ranks == 2
    assert {a.stage for a in sched.actions[0]} == {0, 3}


@pytest.mark.parametrize("ranks,v", [(1, 1), (2, 2), (3, 2), (2, 3), (4, 2), (4, 4)])
def test_interleaved_is_valid_for_every_m(ranks: int, v: int) -> None:
    for m in range(1, 3 * ranks + 2):
        sched = interleaved_1f1b(ranks, v, m)
        validate(sched)
        validate(lower(sched))
        assert sched.stages == ranks * v and sched.ranks == ranks


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_zb_h1_holds_at_most_k_and_is_valid(k: int) -> None:
    for m in range(1, 3 * k + 2):
        sched = zb_h1(k, m)
        validate(sched)
        validate(lower(sched))
        assert max(peak_in_flight(sched)) <= min(k, m)
        assert peak_in_flight(sched) == tuple(in_flight("zb-h1", s, k, m) for s in range(k))


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_zbv_holds_a_1f1b_rank_share(ranks: int) -> None:
    for m in range(1, 3 * ranks + 1):
        sched = zbv(ranks, m)
        validate(lower(validate(sched)))
        peak = peak_in_flight(sched)
        # each stage at most R micro-batches: a rank holds 2R stage-shares, 1F1B's R full ones
        assert max(peak) <= min(ranks, m)


def test_make_schedule_checks_stages_per_rank() -> None:
    assert make_schedule("interleaved", 6, 4, stages_per_rank=3).ranks == 2
    assert make_schedule("zbv", 4, 4).placement == (0, 1, 1, 0)
    assert make_schedule("interleaved", 3, 4).placement == ()  # V = 1: plain 1F1B order
    for name, k, v, words in [("gpipe", 4, 2, "use V=1"), ("interleaved", 5, 2, "divide"),
                              ("zbv", 4, 4, "--stages-per-rank 2"), ("zbv", 3, 2, "divide"),
                              ("nope", 4, 1, "unknown")]:
        with pytest.raises(ValueError, match=words):
            make_schedule(name, k, 4, stages_per_rank=v)


def test_interleaved_v1_is_1f1b() -> None:
    assert interleaved_1f1b(3, 1, 5).actions == one_f_one_b(3, 5).actions


def test_list_schedule_respects_caps_and_runs_full_backwards() -> None:
    costs = Costs((1.0, 2.0, 1.0), (1.0, 1.0, 3.0), (0.5, 0.5, 0.5), (0.1,) * 3, (0.1,) * 3)
    sched = list_schedule(costs, (0, 1, 2), 6, (3, 2, 1))
    validate(sched)
    assert peak_in_flight(sched) == (3, 2, 1)
    full = list_schedule(Costs.uniform(3, split=False), (0, 1, 2), 4, (3, 2, 1))
    assert {a.kind for row in full.actions for a in row} == {"F", "B"}
    validate(full)
    with pytest.raises(ValueError, match="cap"):
        list_schedule(costs, (0, 1, 2), 6, (3, 0, 1))
    with pytest.raises(ValueError, match="priority"):
        list_schedule(costs, (0, 1, 2), 6, (3, 2, 1), priority="IFF")


def test_parse_reads_the_placement_back() -> None:
    sched = interleaved_1f1b(2, 2, 2)
    again = Schedule.parse(str(sched), "interleaved")
    assert again == sched
