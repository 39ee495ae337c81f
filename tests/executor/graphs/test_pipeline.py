"""Transparency of graph plans in one process: the loss and every gradient equal the plain model's."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from executor import Pipeline, manual_plan
from executor.graphs.capture import TraceError
from executor.graphs.layers import trace_model
from executor.workloads.graphmodels import build_graph_model
from partitioner.formats.plan import PlanError
from tests.graph_cases import CASES, balanced_nodes, grad_problems, model_grads, plain_step

pytest.importorskip("transformers")

MODELS = ("tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-resnet", "tiny-unet")
B = 6


@functools.cache
def _layers(name: str) -> int:
    w = build_graph_model(name, batch=2)
    return trace_model(w.model, w.sample, check=False).num_layers


def _stage_counts(name: str) -> tuple[int, ...]:
    return (2, 3, 4) if name == "tiny-unet" else (2, 3)


@pytest.mark.parametrize("name", MODELS)
def test_graph_plans_train_as_the_plain_model(name: str) -> None:
    w = build_graph_model(name, batch=B)
    L = _layers(name)
    failures = []
    for k in _stage_counts(name):
        for m, recompute, schedule in CASES:
            model = copy.deepcopy(w.model)
            loss0, want = plain_step(model, w.sample, w.target, w.loss_fn, m)
            plan = manual_plan(None, m, B, schedule, recompute, nodes=balanced_nodes(L, k))
            pipe = Pipeline(model, plan)
            loss = float(pipe.train_step(w.sample, w.target, w.loss_fn))
            got = model_grads(model)
            problems = grad_problems(got, want)
            if abs(loss - loss0) > 1e-5 * abs(loss0) or problems:
                failures.append(f"K={k} M={m} {recompute} {schedule}: loss {loss} vs {loss0}; "
                                f"{problems[:3]}")
    assert not failures, "\n".join(failures)


def test_split_backward_and_the_v_shape_train_as_the_plain_model() -> None:
    # tiny GPT-2: its Conv1D layers (addmm) leave their weight gradients to W; in the V shape
    # the tied embedding and LM head are on stages 0 and 3, which the runner keeps on one device
    w = build_graph_model("tiny-gpt2", batch=7)
    L = _layers("tiny-gpt2")
    failures = []
    for schedule, k, recompute in (("zb-h1", 2, "always"), ("zbv", 4, "except_last")):
        model = copy.deepcopy(w.model)
        loss0, want = plain_step(model, w.sample, w.target, w.loss_fn, 3)
        pipe = Pipeline(model, manual_plan(None, 3, 7, schedule, recompute,
                                           nodes=balanced_nodes(L, k)))
        loss = float(pipe.train_step(w.sample, w.target, w.loss_fn))
        assert pipe.last_timeline is not None
        kinds = {e.action.kind for e in pipe.last_timeline.events}
        problems = grad_problems(model_grads(model), want)
        if abs(loss - loss0) > 1e-5 * abs(loss0) or problems or not {"I", "W"} <= kinds:
            failures.append(f"{schedule} K={k} {recompute}: loss {loss} vs {loss0}; "
                            f"{problems[:3]}; kinds {sorted(kinds)}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-unet"])
def test_eval_mode_forward_equals_the_whole_batch(name: str) -> None:
    w = build_graph_model(name, batch=B)
    model = w.model.eval()
    with torch.no_grad():
        want = model(w.sample)
    want = want if isinstance(want, torch.Tensor) else want.logits
    pipe = Pipeline(model, manual_plan(None, 3, B, nodes=balanced_nodes(_layers(name), 2)))
    out = pipe(w.sample)
    out = out if isinstance(out, torch.Tensor) else out.logits
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)
    # and in eval mode a training step equals the whole batch's step too (no per-batch stats)
    loss0, grads = plain_step(model, w.sample, w.target, w.loss_fn, 1)
    loss = pipe.train_step(w.sample, w.target, w.loss_fn)
    assert abs(float(loss) - loss0) <= 1e-5 * abs(loss0)
    assert not grad_problems(model_grads(model), grads)


def test_a_mode_change_traces_again_and_keeps_the_layers() -> None:
    w = build_graph_model("tiny-resnet", batch=4)
    pipe = Pipeline(w.model, manual_plan(None, 2, 4, nodes=balanced_nodes(_layers(
        "tiny-resnet"), 2)))
    pipe.train_step(w.sample, w.target, w.loss_fn)
    trained = pipe.layer_graph
    w.model.eval()
    pipe(w.sample)
    assert pipe.layer_graph is not trained
    assert pipe.layer_graph is not None and trained is not None
    assert [la.name for la in pipe.layer_graph.layers] == [la.name for la in trained.layers]


def test_outputs_keep_the_models_own_type() -> None:
    w = build_graph_model("tiny-bert", batch=4)
    pipe = Pipeline(w.model.eval(), manual_plan(None, 2, 4, nodes=balanced_nodes(
        _layers("tiny-bert"), 3)))
    out = pipe(w.sample)
    with torch.no_grad():
        want = w.model(**w.sample)
    assert type(out) is type(want) and torch.allclose(out.logits, want.logits, atol=1e-6)


# -- refusals, before any work -------------------------------------------------------------

def test_a_chain_plan_for_a_graph_model_is_refused() -> None:
    w = build_graph_model("tiny-unet", batch=2)
    with pytest.raises(PlanError, match="chain plan"):
        Pipeline(w.model, manual_plan([0, 3, _layers("tiny-unet")], 1, 2), sample=w.sample)


def test_a_plan_for_another_model_is_refused() -> None:
    w = build_graph_model("tiny-unet", batch=2)
    with pytest.raises(PlanError, match="layers but the traced model has"):
        Pipeline(w.model, manual_plan(None, 1, 2, nodes=[[0, 1], [2]]), sample=w.sample)
    L = _layers("tiny-unet")
    plan = manual_plan(None, 1, 2, nodes=balanced_nodes(L, 2))
    plan = type(plan)(**{**plan.__dict__, "trace": {"layer_names": ["x"] * L}})
    with pytest.raises(PlanError, match="made for another model"):
        Pipeline(w.model, plan, sample=w.sample)


def test_a_stage_set_that_is_not_convex_is_refused() -> None:
    w = build_graph_model("tiny-unet", batch=2)
    L = _layers("tiny-unet")
    nodes = [[0, *range(2, L)], [1]]  # layer 1 feeds layer 2, which runs earlier
    with pytest.raises(PlanError, match="convex"):
        Pipeline(w.model, manual_plan(None, 1, 2, nodes=nodes), sample=w.sample)


def test_a_model_that_branches_on_its_data_is_refused_with_the_fix() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    with pytest.raises(TraceError, match="leaf"):
        trace_model(Branchy(), torch.ones(2, 2))


def test_tied_stages_on_two_devices_are_refused_in_one_process() -> None:
    w = build_graph_model("tiny-gpt2", batch=2)
    L = _layers("tiny-gpt2")
    plan = manual_plan(None, 1, 2, nodes=balanced_nodes(L, 2), devices=["cpu:0", "meta"])
    with pytest.raises((PlanError, ValueError)):
        Pipeline(w.model, plan, sample=w.sample)


def test_predicted_messages_are_the_ones_sent() -> None:
    from executor.profiling.graph import profile_graph
    from partitioner import stage_messages

    w = build_graph_model("tiny-llama", batch=4)
    prof = profile_graph(w.model, w.sample, (2,), repeats=1)
    nodes = balanced_nodes(prof.num_layers, 3)
    stage_of = [k for k, n in enumerate(nodes) for _ in n]
    predicted = stage_messages(prof, stage_of, 2)
    pipe = Pipeline(w.model, manual_plan(None, 2, 4, nodes=nodes))
    pipe.train_step(w.sample, w.target, w.loss_fn)
    sent_f = {(s, d): b for kind, s, d, mb, b in pipe.transport_log if kind == "F" and mb == 0}
    sent_b = {(d, s): b for kind, s, d, mb, b in pipe.transport_log if kind == "B" and mb == 0}
    assert set(sent_f) == set(predicted)
    for pair, msg in predicted.items():
        assert sent_f[pair] == msg.bytes, pair
        assert sent_b.get(pair, 0) == msg.grad_bytes, pair
    assert any(d > s + 1 for s, d in predicted)  # a skip that goes straight past a stage
