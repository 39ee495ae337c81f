"""Graph plans: the messages between stages, the tied parameters' stages and the trace."""

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from partitioner.cost.messages import Message, stage_messages
from partitioner.cost.model import CostModel
from partitioner.cost.partition import evaluate_assignment
from partitioner.formats.plan import PlanError, load_plan, plan_from_dict, plan_to_dict, save_plan
from partitioner.formats.profile import load_profile
from partitioner.solve.planner import make_plan, plan_from_solution
from tests.synthetic import llama_like

TRACE = {"tracer": "fx", "leaf_modules": ["LlamaDecoderLayer"], "layer_names": ["embed"]}


def llama_plan() -> tuple[CostModel, Any]:
    prof = dataclasses.replace(llama_like(), extra={"trace": TRACE})
    cm = CostModel(prof, 4, 2, stages=3)  # micro-batches of 2
    return cm, plan_from_solution(cm, evaluate_assignment(cm, [0, 1, 2, 2]))


def test_a_graph_plan_lists_messages_ties_and_the_trace(tmp_path: Path) -> None:
    cm, plan = llama_plan()
    assert plan.messages == stage_messages(cm.profile, [0, 1, 2, 2], 2)
    assert plan.messages[0, 2] == Message(("mask", "cos", "sin"), 32.0, 0.0)
    assert plan.tied == {"embed.weight": (0, 2)}
    assert plan.trace == TRACE
    data = plan_to_dict(plan)
    assert data["messages"][0] == {"src": 0, "dst": 1, "values": ["hidden", "mask", "cos", "sin"],
                                   "bytes": 232, "grad_bytes": 200}
    assert data["tied"] == [{"name": "embed.weight", "stages": [0, 2]}]
    save_plan(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == plan
    plan.check_against(4, cm.profile)


def test_graph_profiles_get_messages_also_when_the_stages_are_ranges() -> None:
    cm = CostModel(load_profile("pipedream/resnet18"), 4, 4, stages=2)
    plan = make_plan(cm)  # the DP: ranges of the layer order
    assert not plan.is_graph and plan.messages
    assert all(src < dst for src, dst in plan.messages) and not plan.tied and not plan.trace
    chain = make_plan(CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=2))
    data = plan_to_dict(chain)
    assert not ({"messages", "tied", "trace"} & set(data)) and chain.messages == {}


def test_bad_messages_and_ties_are_named_with_their_paths() -> None:
    _, plan = llama_plan()
    data = json.loads(json.dumps(plan_to_dict(plan)))
    data["messages"][0]["src"] = 2
    data["messages"][1]["dst"] = 7
    data["messages"][2]["values"] = "block0"
    data["messages"].append({"src": 1, "dst": 2, "values": [], "bytes": -1, "grad": 1})
    data["tied"] = [{"name": "embed.weight", "stages": [2, 0]}, {"name": "w", "stages": [5]}]
    data["trace"] = ["fx"]
    with pytest.raises(PlanError) as info:
        plan_from_dict(data)
    text = str(info.value)
    for part in ("messages[0]: src 2 is not before dst 1; a message goes forward",
                 "messages[1].dst: 7 is outside 0..2",
                 "messages[2].values: 'block0' is not a list of value names",
                 "messages[3]: unknown key 'grad'", "messages[3].bytes: -1 is negative",
                 "messages[3]: the pair 1 -> 2 is listed twice",
                 "tied[0].stages: [2, 0] is not a sorted list of distinct stages in 0..2",
                 "tied[1].stages: [5] is not a sorted list",
                 "trace: expected an object (how the executor traced the model)"):
        assert part in text, part
