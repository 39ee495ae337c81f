"""torch.distributed.pipelining's compute-only CSV: the form, both directions, and refusals.

That torch's own loader accepts these files and trains with them is tested on two gloo ranks
in tests/partitioner/cli/test_export.py (from a plan, through the command).
"""

import pytest

from partitioner.schedule.generators import make_schedule
from partitioner.schedule.ir import Schedule, ScheduleError, lower
from partitioner.schedule.torchcsv import from_torch_csv, to_torch_csv

CASES = [("gpipe", 3, 4, 1), ("1f1b", 4, 6, 1), ("interleaved", 4, 4, 2),
         ("interleaved", 6, 5, 3), ("zb-h1", 3, 5, 1), ("zbv", 4, 4, 2), ("zbv", 6, 7, 2)]


@pytest.mark.parametrize("name,stages,microbatches,v", CASES)
def test_round_trip_keeps_every_action_and_the_placement(name: str, stages: int,
                                                         microbatches: int, v: int) -> None:
    sched = make_schedule(name, stages, microbatches, v)
    back = from_torch_csv(to_torch_csv(sched), name)
    assert back.actions == sched.actions and back.rank_of == sched.rank_of


def test_columns_are_the_clock_and_idle_steps_are_empty() -> None:
    sched = make_schedule("1f1b", 2, 3)
    assert to_torch_csv(sched) == ("0F0,0F1,,0B0,0F2,0B1,,0B2\n"
                                   ",1F0,1B0,1F1,1B1,1F2,1B2,\n")
    clock = sched.clock()
    assert clock is not None
    rows = [line.split(",") for line in to_torch_csv(sched).splitlines()]
    assert all(len(row) == len(clock) for row in rows)
    assert all(cell == ("" if clock[t][r] is None else str(clock[t][r]))
               for r, row in enumerate(rows) for t, cell in enumerate(row))


def test_torch_spelling_of_the_kinds() -> None:
    """F = FORWARD, B = FULL_BACKWARD, I = BACKWARD_INPUT, W = BACKWARD_WEIGHT."""
    text = to_torch_csv(make_schedule("zb-h1", 2, 2))
    assert {cell[1] for cell in text.replace("\n", ",").split(",") if cell} == {"F", "I", "W"}
    assert "B" in to_torch_csv(make_schedule("gpipe", 2, 2))


def test_refuses_a_lowered_schedule_and_one_that_cannot_run() -> None:
    with pytest.raises(ValueError, match="export the schedule before lower"):
        to_torch_csv(lower(make_schedule("1f1b", 2, 2)))
    stuck = Schedule.parse("0: 0F0 0B0\n1: 1B0 1F0")
    with pytest.raises(ScheduleError, match="backward before the forward"):
        to_torch_csv(stuck)


@pytest.mark.parametrize("text,words", [
    ("0F0,0SEND_F0,0B0\n1RECV_F0,1F0,1B0\n", "'0SEND_F0'"),
    ("0UNSHARD,0F0,0B0\n", "'0UNSHARD'"),
    ("0F0,0X0\n", "'0X0'"),
])
def test_reading_refuses_what_is_not_compute_only(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as info:
        from_torch_csv(text)
    assert "format='compute_only'" in str(info.value)


def test_reading_refuses_rows_that_are_not_a_schedule() -> None:
    with pytest.raises(ValueError, match="no rows"):
        from_torch_csv("")
    with pytest.raises(ValueError, match="stage 0 has actions on rows 0 and 1"):
        from_torch_csv("0F0,0B0\n0F1,0B1\n")
    with pytest.raises(ScheduleError, match="0F1 is missing"):
        from_torch_csv("0F0,0B0,0B1\n")
