"""Placing D replicas on a topology: the planner simulates both layouts and keeps the faster."""

from __future__ import annotations

import pytest

from partitioner.cost.model import CostModel
from partitioner.formats.assumptions import Link
from partitioner.formats.plan import plan_from_dict, plan_to_dict
from partitioner.formats.profile import load_profile
from partitioner.formats.topology import Topology
from partitioner.simulator.plans import simulate_plan
from partitioner.solve.placement import placements, stage_major_layout
from partitioner.solve.planner import make_plan
from tests.synthetic import make_profile

# 2 nodes of 4: a fast link inside a node, a slow one between
TOPO = Topology(2, 4, Link(400.0, 0.001), Link(4.0, 0.01))


def _plan(params: int, activation_bytes: float):  # type: ignore[no-untyped-def]
    prof = make_profile([1.0] * 4, param_bytes=[params] * 4, out_bytes=[activation_bytes] * 4)
    cm = CostModel(prof, 16, 4, stages=4, replicas=2, schedule="1f1b")
    return make_plan(cm, topology=TOPO)


def test_big_gradients_keep_the_allreduce_inside_a_node() -> None:
    plan = _plan(params=10**9, activation_bytes=1e3)
    assert plan.layout == stage_major_layout(4, 2) == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert plan.extra["placement"].startswith("layout stage-major")
    assert "replica-major" in plan.extra["placement"]  # the other one, with its step


def test_big_activations_keep_the_pipeline_inside_a_node() -> None:
    plan = _plan(params=1000, activation_bytes=1e8)
    assert plan.layout is None and plan.rank_layout == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert plan.extra["placement"].startswith("layout replica-major")


def test_one_node_has_one_layout() -> None:
    one = Topology(1, 8, Link(400.0, 0.001), Link(4.0, 0.01))
    assert [p.name for p in placements(one, (0, 1, 2, 3), 2)] == ["replica-major"]
    assert len(placements(TOPO, (0, 1, 2, 3), 2)) == 2


def test_planned_replicas_round_trip_and_resimulate() -> None:
    prof = load_profile("h200/gpt2-medium")
    cm = CostModel(prof, 64, 4, stages=2, replicas=4, shard_optimizer=True)
    plan = make_plan(cm, topology=TOPO)
    assert (plan.replicas, plan.world_size, plan.shard_optimizer) == (4, 8, True)
    back = plan_from_dict(plan_to_dict(plan))
    assert back == plan
    res, again, _ = simulate_plan(back, prof)
    assert plan.predicted is not None
    assert res.step_ms == pytest.approx(plan.predicted.step_ms)
    assert again.microbatch_size == 4  # 64 / (4 x 4)
    assert "all-reduce overlapped" in plan.predicted.method


def test_too_many_ranks_for_the_topology_is_refused() -> None:
    cm = CostModel(load_profile("h200/gpt2-medium"), 64, 4, stages=4, replicas=4)
    with pytest.raises(ValueError, match=r"need 16 devices; the topology has 8 .*fewer stages "
                                         r"or replicas"):
        make_plan(cm, topology=TOPO)
