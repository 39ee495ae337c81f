"""Schedule generators against literal grids, the text form, lowering and validation."""

import pytest

from partitioner.schedule.generators import gpipe, make_schedule, one_f_one_b
from partitioner.schedule.ir import Action, Schedule, ScheduleError, lower, validate
from tests.synthetic import schedule_from_rows

GPIPE_3x4 = """
t  stage0  stage1  stage2
0  0F0
1  0F1     1F0
2  0F2     1F1     2F0
3  0F3     1F2     2F1
4          1F3     2F2
5                  2F3
6                  2B3
7          1B3     2B2
8  0B3     1B2     2B1
9  0B2     1B1     2B0
10 0B1     1B0
11 0B0
"""


def _norm(grid: str) -> list[list[str]]:
    return [line.split() for line in grid.strip().splitlines()]


def test_gpipe_grid_is_fill_drain() -> None:
    # (M + K - 1) clocks of forwards then as many of backwards: the paper's Figure 2
    assert _norm(gpipe(3, 4).grid()) == _norm(GPIPE_3x4)


def test_one_f_one_b_lists() -> None:
    assert str(one_f_one_b(3, 4)) == (
        "0: 0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3\n"
        "1: 1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3\n"
        "2: 2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3")


@pytest.mark.parametrize("k,m", [(1, 1), (2, 5), (4, 2), (4, 8), (8, 3)])
def test_generators_are_valid_and_take_as_long(k: int, m: int) -> None:
    for sched in (gpipe(k, m), one_f_one_b(k, m)):
        validate(sched)
        validate(lower(sched))
        clock = sched.clock()
        assert clock is not None and len(clock) == 2 * (m + k - 1)


def test_one_f_one_b_holds_at_most_k_minus_k_in_flight() -> None:
    k_stages, m = 4, 8
    for k, row in enumerate(one_f_one_b(k_stages, m).actions):
        live = peak = 0
        for a in row:
            live += 1 if a.kind == "F" else -1
            peak = max(peak, live)
        assert peak == min(k_stages - k, m)


def test_text_round_trip() -> None:
    assert str(Action("F", 1, 3)) == "1F3" and Action.parse("1F3") == Action("F", 1, 3)
    assert Action.parse("12SB7") == Action("SB", 12, 7)
    with pytest.raises(ValueError, match="'1X3'"):
        Action.parse("1X3")
    sched = lower(one_f_one_b(3, 5))
    again = Schedule.parse(str(sched), "1f1b")
    assert again == sched


def test_lowering_brackets_compute_with_communication() -> None:
    low = lower(gpipe(2, 1))
    assert str(low) == "0: 0F0 0SF0 0RB0 0B0\n1: 1RF0 1F0 1B0 1SB0"
    with pytest.raises(ValueError, match="already lowered"):
        lower(low)


def test_validate_names_stage_and_step() -> None:
    bad = schedule_from_rows("bad", [["0F0", "0B0", "0B0"], ["1B0", "1F0"]])
    with pytest.raises(ScheduleError) as info:
        validate(bad)
    msg = str(info.value)
    assert "stage 0, step 2 (0B0): repeats step 1" in msg
    assert "stage 1, step 0 (1B0): backward before the forward of micro-batch 0" in msg
    assert "stage0" in msg  # the grid is shown
    missing = schedule_from_rows("short", [["0F0", "0F1", "0B1"], ["1F0", "1F1", "1B1", "1B0"]])
    with pytest.raises(ScheduleError, match="stage 0: 0B0 is missing"):
        validate(missing)


def test_validate_finds_deadlock() -> None:
    # stage 1 waits for 0F1, which stage 0 runs only after 0B0, which needs 1B0: a cycle
    stuck = schedule_from_rows("stuck", [["0F0", "0B0", "0F1", "0B1"], ["1F1", "1F0", "1B0", "1B1"]])
    with pytest.raises(ScheduleError, match=r"deadlock: stage 0 at step 1 \(0B0\) waits for 1B0"):
        validate(stuck)


def test_lowered_send_after_compute() -> None:
    bad = schedule_from_rows("late", [["0SF0", "0F0", "0RB0", "0B0"], ["1RF0", "1F0", "1B0", "1SB0"]])
    with pytest.raises(ScheduleError, match=r"stage 0, step 1 \(0F0\): its send 0SF0 comes first"):
        validate(bad)


def test_make_schedule() -> None:
    assert make_schedule("1f1b", 2, 2) == one_f_one_b(2, 2)
    with pytest.raises(ValueError, match="'zigzag' is unknown"):
        make_schedule("zigzag", 2, 2)
    with pytest.raises(ValueError, match="K=0"):
        gpipe(0, 2)


def test_split_backward_text_and_lowering() -> None:
    sched = Schedule.parse("0: 0F0 0I0 0W0\n1: 1F0 1I0 1W0")
    assert Action.parse("1I3") == Action("I", 1, 3) and str(Action("W", 0, 2)) == "0W2"
    assert str(lower(validate(sched))) == ("0: 0F0 0SF0 0RB0 0I0 0W0\n"
                                           "1: 1RF0 1F0 1I0 1SB0 1W0")
    validate(lower(sched))


def test_validate_split_backward_order_and_counts() -> None:
    cases = [("0: 0F0 0W0 0I0\n1: 1F0 1I0 1W0", "weight gradient before the input gradient"),
             ("0: 0F0 0I0\n1: 1F0 1I0 1W0", "0W0 is missing"),
             ("0: 0F0 0I0 0W0 0B0\n1: 1F0 1B0", "both B and I/W"),
             ("0: 0F0 0I0 0W0\n1: 1F0 1W0 1I0", "weight gradient before")]
    for text, words in cases:
        with pytest.raises(ScheduleError, match=words):
            validate(Schedule.parse(text))


def test_validate_checks_placement() -> None:
    good = Schedule.parse("0: 0F0 2F0 2B0 0B0\n1: 1F0 1B0")
    assert good.placement == (0, 1, 0) and good.rank_of == (0, 1, 0)
    validate(good)
    wrong_rank = Schedule(good.name, 3, 1, good.actions, (0, 1, 1))
    with pytest.raises(ScheduleError, match="stage 2 runs on rank 1"):
        validate(wrong_rank)
    with pytest.raises(ScheduleError, match="ranks \\[1\\] run no stage"):
        validate(Schedule("x", 2, 1, ((Action("F", 0, 0), Action("F", 1, 0), Action("B", 1, 0),
                                       Action("B", 0, 0)), ()), (0, 0)))
    with pytest.raises(ValueError, match="one rank"):
        Schedule.parse("0: 0F0 1F0\n1: 1B0 0B0")


def test_grid_of_placed_schedule_names_ranks() -> None:
    grid = Schedule.parse("0: 0F0 2F0 2B0 0B0\n1: 1F0 1B0").grid()
    assert grid.splitlines()[0].split() == ["t", "rank0", "rank1"]
    assert len(grid.splitlines()) == 1 + 6  # 0F0 1F0 2F0 2B0 1B0 0B0: one clock each
