"""Plans with data-parallel replicas: the fields, their checks, and older plans."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from partitioner import CostModel, load_profile, make_plan
from partitioner.formats.plan import PlanError, load_plan, plan_from_dict, plan_to_dict, save_plan
from partitioner.formats.plan_replicas import default_layout, position


def _plan_dict(**fields: Any) -> dict[str, Any]:
    plan = make_plan(CostModel(load_profile("h200/gpt2-medium"), 16, 2, stages=2))
    return {**plan_to_dict(plan), **fields}


def test_older_plans_read_as_one_replica() -> None:
    data = _plan_dict()
    assert "replicas" not in data and "layout" not in data  # unchanged for D = 1
    plan = plan_from_dict(data)
    assert (plan.replicas, plan.world_size, plan.replica_batch) == (1, 2, 16)
    assert plan.rank_layout == ((0, 1),) and plan.position(1) == (0, 1)


def test_replicas_and_layout_round_trip(tmp_path: Path) -> None:
    plan = plan_from_dict(_plan_dict(replicas=4, layout=[[0, 4], [1, 5], [2, 6], [3, 7]],
                                     shard_optimizer=True))
    assert plan.shard_optimizer
    assert (plan.replicas, plan.world_size, plan.replica_batch) == (4, 8, 4)
    assert plan.position(5) == (1, 1) and plan.position(3) == (3, 0)
    save_plan(plan, tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json") == plan
    default = plan_from_dict(_plan_dict(replicas=2))
    assert default.rank_layout == ((0, 1), (2, 3)) and default.layout is None
    assert "layout" not in plan_to_dict(default) and not default.shard_optimizer
    assert replace(default, replicas=1).world_size == 2


def test_interleaved_replicas_count_pipeline_ranks() -> None:
    plan = make_plan(CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=4,
                               schedule="interleaved", stages_per_rank=2))
    data = {**plan_to_dict(plan), "replicas": 2}
    got = plan_from_dict(data)
    assert (got.pipeline_ranks, got.world_size) == (2, 4)


@pytest.mark.parametrize(("fields", "needle"), [
    ({"replicas": 3}, "global_batch 16 does not split into 3 equal shares"),
    ({"replicas": 16}, "each of the 16 replicas gets 1 samples, fewer than microbatches 2"),
    ({"replicas": 0}, "replicas: 0 is outside 1.."),
    ({"replicas": 2.0}, "replicas: 2.0 is not a whole number"),
    ({"replicas": 2, "layout": [[0, 1]]}, "is not 2 lists (one per replica) of 2 global ranks"),
    ({"replicas": 2, "layout": [[0, 1], [1, 2]]}, "must hold each of 0..3 exactly once"),
    ({"layout": [[0, True]]}, "is not 1 lists"),
    ({"shard_optimizer": "yes"}, "shard_optimizer: 'yes' is not true or false"),
])
def test_bad_replica_fields_are_named(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(PlanError) as err:
        plan_from_dict(_plan_dict(**fields))
    assert needle in str(err.value)


def test_position_names_a_rank_outside_the_layout() -> None:
    assert default_layout(3, 2) == ((0, 1, 2), (3, 4, 5))
    with pytest.raises(ValueError, match="global rank 6 is not in the plan's layout of 6 ranks"):
        position(default_layout(3, 2), 6)
