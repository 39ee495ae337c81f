"""A plan's schedule fields: V stages per rank, synthesised actions, and their checks."""

import pytest

from partitioner import CostModel, load_profile, make_plan
from partitioner.formats.plan import PlanError, plan_from_dict, plan_to_dict
from partitioner.schedule.generators import zb_h1


def _plan_dict(stages: int = 4) -> dict[str, object]:
    cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=stages)
    return plan_to_dict(make_plan(cm))


def test_older_plans_read_as_one_stage_per_rank() -> None:
    plan = plan_from_dict(_plan_dict())
    assert plan.stages_per_rank == 1 and plan.actions is None
    assert plan.build_schedule().ranks == 4
    assert "stages_per_rank" not in plan_to_dict(plan)


def test_interleaved_and_zbv_round_trip() -> None:
    data = _plan_dict() | {"schedule": "interleaved", "stages_per_rank": 2}
    plan = plan_from_dict(data)
    assert plan.build_schedule().placement == (0, 1, 0, 1)
    assert plan_from_dict(plan_to_dict(plan)) == plan
    zbv = plan_from_dict(_plan_dict() | {"schedule": "zbv"})
    assert zbv.stages_per_rank == 2 and zbv.build_schedule().placement == (0, 1, 1, 0)


def test_synth_plans_carry_their_actions() -> None:
    text = str(zb_h1(4, 4))
    plan = plan_from_dict(_plan_dict() | {"schedule": "synth", "actions": text})
    assert str(plan.build_schedule()) == text
    assert plan_from_dict(plan_to_dict(plan)) == plan


@pytest.mark.parametrize("extra,words", [
    ({"schedule": "synth"}, "lists its actions"),
    ({"schedule": "gpipe", "stages_per_rank": 2}, "use V=1"),
    ({"schedule": "interleaved", "stages_per_rank": 3}, "V must divide K"),
    ({"schedule": "synth", "actions": str(zb_h1(3, 4))}, "K=3, M=4 but it has K=4"),
    ({"schedule": "synth", "actions": "0: 0F0 0W0 0I0"}, "actions"),
    ({"schedule": "zigzag"}, "is not one of"),
])
def test_bad_schedule_fields_are_refused(extra: dict[str, object], words: str) -> None:
    with pytest.raises(PlanError, match=words):
        plan_from_dict(_plan_dict() | extra)
