"""Schedules as the event loop reads them: a lowered schedule folds into the plain one's steps,
and a schedule that cannot run is refused with validate's message."""

import pytest

from partitioner.schedule.generators import make_schedule
from partitioner.schedule.ir import Schedule, ScheduleError, lower
from partitioner.simulator.program import KINDS, rank_programs


@pytest.mark.parametrize("name,big_k,m,v", [("gpipe", 3, 4, 1), ("1f1b", 4, 5, 1),
                                            ("zb-h1", 3, 5, 1), ("zbv", 4, 3, 2),
                                            ("interleaved", 6, 4, 3)])
def test_lowered_schedules_fold_into_the_plain_steps(name: str, big_k: int, m: int,
                                                     v: int) -> None:
    sched = make_schedule(name, big_k, m, v)
    plain, lowered = rank_programs(sched), rank_programs(lower(sched))
    assert plain == lowered
    for r, ops in enumerate(plain):
        assert [op[5] for op in ops] == list(sched.actions[r])  # one step per compute action
        for recv, work, send, k, i, act in ops:
            assert act is not None and (act.stage, act.microbatch) == (k, i)
            assert KINDS[work] == act.kind
            # receives and sends as lower() brackets them: none at the pipeline's ends, none
            # around W
            assert (KINDS[recv], KINDS[send]) == {
                "F": ("RF" if k > 0 else "", "SF" if k < big_k - 1 else ""),
                "W": ("", "")}.get(act.kind, ("RB" if k < big_k - 1 else "",
                                              "SB" if k > 0 else ""))


@pytest.mark.parametrize("text,words", [
    ("0: 0F0 0W0 0I0\n1: 1F0 1I0 1W0", "weight gradient before the input gradient"),
    ("0: 0F0 0I0 0B0\n1: 1F0 1B0", "has both B and I/W"),
    ("0: 0F0 0I0\n1: 1F0 1I0 1W0", "0W0 is missing"),
])
def test_a_schedule_that_cannot_run_is_refused_with_the_grid(text: str, words: str) -> None:
    with pytest.raises(ScheduleError, match=words):
        rank_programs(Schedule.parse(text))


def test_an_action_on_another_ranks_row_is_refused() -> None:
    sched = make_schedule("zbv", 4, 2)
    rows = list(sched.actions)
    rows[0], rows[1] = rows[0] + (rows[1][0],), rows[1][1:]  # a stage-1 action on rank 0
    with pytest.raises(ScheduleError, match="runs on rank 1"):
        rank_programs(Schedule(sched.name, 4, 2, tuple(rows), sched.placement))
