import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from partitioner.cost.model import CostModel
from partitioner.cost.partition import evaluate_assignment, stage_costs
from partitioner.formats.assumptions import LINKS, Link, Runtime
from partitioner.formats.layers import stage_of_nodes
from partitioner.formats.plan import (
    Plan,
    PlanError,
    load_plan,
    plan_from_dict,
    plan_to_dict,
    save_plan,
)
from partitioner.formats.profile import load_profile
from partitioner.simulator.engine import ranges_from_boundaries, simulate
from partitioner.solve.chain import partition_chain
from partitioner.solve.planner import make_plan


def _plan() -> tuple[Plan, CostModel]:
    cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=4, recompute="except_last",
                   link=LINKS["nvlink"])
    return make_plan(cm, 80 * 2**30), cm


def test_round_trip_and_closed_form(tmp_path: Path) -> None:
    plan, cm = _plan()
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    assert load_plan(path) == plan
    data = json.loads(path.read_text())
    assert data["format"] == "gpipe-plan/1"
    assert data["stages"][0]["layers"] == [0, 6] and data["stages"][0]["device"] == "cuda:0"
    # plans carry the simulator's prediction of their schedule
    assert plan.predicted is not None and plan.predicted.method == "simulated"
    sim = simulate(cm, ranges_from_boundaries(plan.boundaries))
    assert plan.predicted.step_ms == sim.step_ms
    assert plan.predicted.stage_peak_bytes == sim.stage_peak_bytes
    assert plan.predicted.bubble_fraction >= 3 / 7 - 1e-12  # never below the balanced ideal
    # the per-stage figures are the partition's
    pred = plan.predicted
    stage_ms = [c + m for c, m in zip(pred.stage_compute_ms, pred.stage_comm_ms, strict=True)]
    assert tuple(stage_ms) == pytest.approx(partition_chain(cm, 80 * 2**30).stage_ms)
    assert all(m <= 80 * 2**30 for m in pred.stage_peak_bytes)


def test_plan_is_refused_for_another_model_or_profile() -> None:
    plan, _ = _plan()
    plan.check_against(26, load_profile("h200/gpt2-medium"))
    with pytest.raises(PlanError, match="covers 26 layers but the model has 24"):
        plan.check_against(24)
    with pytest.raises(PlanError, match=r"not from .gpt-1\.3b."):
        plan.check_against(26, load_profile("h200/gpt-1.3b"))


def test_invalid_plans_list_every_problem() -> None:
    plan, _ = _plan()
    data = plan_to_dict(plan)
    data["microbatches"] = 0
    data["schedule"] = "zigzag"
    data["stages"][1]["layers"] = [7, 12]
    data["stages"][2]["layers"] = [12, 12]
    with pytest.raises(PlanError) as info:
        plan_from_dict(data)
    msg = str(info.value)
    assert "microbatches: 0 is outside 1..65536" in msg and "schedule: 'zigzag'" in msg
    assert "stages: stage 1 holds layers [7, 12) but stage 0 ends at layer 6" in msg
    assert "stages: stage 2 holds layers [12, 12), which is empty" in msg


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("[")
    with pytest.raises(PlanError, match="not JSON"):
        load_plan(tmp_path / "bad.json")


def _graph_plan() -> Plan:
    from partitioner.solve.ilp import partition_graph
    from partitioner.solve.planner import plan_from_solution

    cm = CostModel(load_profile("pipedream/resnet18"), 4, 4, stages=8)
    return plan_from_solution(cm, partition_graph(cm, time_limit_s=30))


def test_graph_plan_round_trip_and_convexity(tmp_path: Path) -> None:
    plan = _graph_plan()
    assert plan.is_graph and plan.num_layers == 70
    save_plan(plan, tmp_path / "g.json")
    again = load_plan(tmp_path / "g.json")
    assert again == plan
    again.check_against(70, load_profile("pipedream/resnet18"))
    for s in plan.stages:
        assert s.nodes is not None and s.layers == (s.nodes[0], s.nodes[-1] + 1)
    # Swapping two stages' nodes keeps every layer once but sends edges backwards.
    data = plan_to_dict(plan)
    data["stages"][0], data["stages"][1] = data["stages"][1], data["stages"][0]
    swapped = plan_from_dict(data)
    with pytest.raises(PlanError, match="goes from stage 1 back to stage 0"):
        swapped.check_against(70, load_profile("pipedream/resnet18"))


def test_graph_plan_must_hold_every_layer_once() -> None:
    data = plan_to_dict(_graph_plan())
    first = data["stages"][0]["nodes"]
    data["stages"][0]["nodes"] = [max(data["stages"][1]["nodes"]), *first]  # twice, unsorted
    data["stages"][2]["nodes"] = data["stages"][2]["nodes"][1:]  # one layer lost...
    del data["stages"][3]["nodes"]  # ...and a stage without nodes
    lost = plan_to_dict(_graph_plan())["stages"][2]["nodes"][0]
    with pytest.raises(PlanError) as info:
        plan_from_dict(data)
    msg = str(info.value)
    assert "stages[0].nodes: not sorted or not unique" in msg
    assert "is also in stage 0" in msg
    assert f"layers [{lost}" in msg and "are in no stage" in msg
    assert "stages[3]: has no 'nodes' but other stages do" in msg
    assert "stages[2].layers:" in msg and "is not the span" in msg


def test_graph_plans_carry_the_simulated_prediction() -> None:
    """A graph plan's prediction is its node sets replayed; a chain split of a graph profile
    is costed on the graph too (its skip edges cross the cuts)."""
    cm = CostModel(load_profile("pipedream/resnet18"), 4, 4, stages=4, recompute="always",
                   link=LINKS["pcie"])
    plan = make_plan(cm, solver="ilp", time_limit_s=30)
    assert plan.predicted is not None
    assert plan.predicted.method == "simulated"
    nodes = plan.stage_nodes()
    sim = simulate(cm, nodes=nodes)
    assert (plan.predicted.step_ms, plan.predicted.stage_peak_bytes) == (
        sim.step_ms, sim.stage_peak_bytes)
    graph = evaluate_assignment(cm, stage_of_nodes(nodes))
    assert plan.predicted.stage_comm_ms == graph.stage_comm_ms
    assert plan.predicted.stage_peak_bytes == pytest.approx(graph.stage_memory_bytes)
    chain = make_plan(cm, solver="dp")
    assert chain.predicted is not None and not chain.is_graph
    cuts = chain.boundaries
    split = evaluate_assignment(cm, [k for k in range(4) for _ in range(cuts[k], cuts[k + 1])])
    assert chain.predicted.stage_comm_ms == split.stage_comm_ms
    assert chain.predicted.stage_peak_bytes == pytest.approx(split.stage_memory_bytes)
    assert max(split.stage_comm_ms) > max(stage_costs(cm, cuts).stage_ms[k] - c for k, c in
                                          enumerate(split.stage_compute_ms))  # skips cost
    assert chain.predicted.step_ms > plan.predicted.step_ms


def test_plans_carry_the_runtime_they_were_made_with(tmp_path: Path) -> None:
    cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=4,
                   runtime=Runtime(1.25, 0.5, 0.3))
    plan = make_plan(cm)
    assert plan.runtime == Runtime(1.25, 0.5, 0.3)
    save_plan(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == plan
    assert plan.predicted is not None
    assert plan.predicted.step_ms == pytest.approx(
        simulate(cm, ranges_from_boundaries(plan.boundaries)).step_ms)
    data = plan_to_dict(plan)
    data["cost_model"]["compute_scale"] = -2
    with pytest.raises(PlanError, match=r"cost_model\.compute_scale: -2 is negative"):
        plan_from_dict(data)
    del data["cost_model"]["compute_scale"], data["cost_model"]["action_ms"]
    del data["cost_model"]["message_ms"]
    assert plan_from_dict(data).runtime == Runtime()  # plans written before the runtime


@pytest.mark.parametrize("change,needle", [
    (lambda d: d.update(cost_model=5), "cost_model: expected an object (the planning "
                                       "assumptions), got 5"),
    (lambda d: d["predicted"].update(step_ms="12"), "predicted.step_ms: '12' is not a number"),
    (lambda d: d["cost_model"].update(bandwidth_gbps=-3), "cost_model.bandwidth_gbps: -3 is "
                                                          "negative"),
    (lambda d: d["cost_model"].update(latency_ms=float("nan")), "cost_model.latency_ms: nan is "
                                                                "not finite"),
    (lambda d: d.update(stage=[]), "(top): unknown key 'stage' (did you mean 'stages'?)"),
    (lambda d: d["stages"][0].update(device=7), "stages[0].device: 7 is not a string"),
    (lambda d: d.update(microbatches=True), "microbatches: True is not a whole number"),
    (lambda d: d["profile"].update(layers=0), "profile.layers: 0 is outside 1..1048576"),
])
def test_every_bad_value_is_named_with_its_json_path(change: Any, needle: str) -> None:
    data = plan_to_dict(_plan()[0])
    change(data)
    with pytest.raises(PlanError) as info:
        plan_from_dict(data)
    assert needle in str(info.value)


def test_free_form_extra_survives_a_round_trip() -> None:
    data = plan_to_dict(_plan()[0])
    data["extra"] = {"made_by": "me", "notes": [1, 2]}
    assert plan_to_dict(plan_from_dict(data))["extra"] == {"made_by": "me", "notes": [1, 2]}


@pytest.mark.parametrize("bandwidth,latency,needle", [
    (-1.0, 0.0, "bandwidth_gbps=-1.0"), (0.0, 0.0, "bandwidth_gbps=0.0"),
    (float("nan"), 0.0, "bandwidth_gbps=nan"), (1.0, -0.5, "latency_ms=-0.5"),
    (1.0, float("inf"), "latency_ms=inf"), (1e-9, 0.0, "bandwidth_gbps=1e-09"),
])
def test_links_validate_themselves(bandwidth: float, latency: float, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        Link(bandwidth, latency)
    assert Link(math.inf, 0.0).transfer_ms(1e12) == 0.0
