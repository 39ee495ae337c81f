"""Graph profiles of the example models: valid files, consistent with the trace, times that add
up, tied parameters, the model left as it was, and planning the result."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from executor.graphs.layers import as_call, trace_model
from executor.profiling.graph import profile_graph
from executor.profiling.graphtime import Clock, time_graph_layers
from executor.profiling.profiler import profile_model
from executor.workloads.graphmodels import GRAPH_MODELS, build_graph_model
from partitioner.cost.model import CostModel
from partitioner.formats.profile import Profile, profile_from_dict, profile_to_dict
from partitioner.solve.ilp import partition_graph

pytest.importorskip("transformers")
_CACHE: dict[str, Profile] = {}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def profiled(name: str) -> Profile:
    """One profile per example model, made once for the whole module; timed on the thread's
    CPU clock, which a busy shared machine disturbs less than the wall clock (the split
    backward's passes once read 2.6x the fused ones on the wall clock under load)."""
    if name not in _CACHE:
        w = build_graph_model(name, batch=2)
        _CACHE[name] = profile_graph(w.model, w.sample, (1, 2), repeats=3, warmup=1, name=name,
                                     clock="thread")
    return _CACHE[name]


@pytest.mark.parametrize("name", list(GRAPH_MODELS))
def test_profile_loads_and_matches_the_trace(name: str) -> None:
    prof = profiled(name)
    assert profile_from_dict(profile_to_dict(prof)) == prof
    w = build_graph_model(name, batch=2)
    w.model.train()
    graph = trace_model(w.model, w.sample)
    assert prof.extra["trace"]["layer_names"] == [lay.name for lay in graph.layers]
    assert prof.extra["trace"]["tracer"] == graph.capture.tracer
    assert prof.edges == tuple((u, v) for u, v, _ in graph.edges)
    assert prof.edge_values is not None
    for (u, _v), reads, (_, _, names) in zip(prof.edges, prof.edge_values, graph.edges,
                                            strict=True):
        outs = prof.layers[u].outputs
        assert outs is not None and tuple(outs[j].name for j in reads) == names
    for lay, layer in zip(prof.layers[:-1], graph.layers, strict=False):
        assert lay.outputs is not None and [o.name for o in lay.outputs] == layer.outputs
        assert all(o.grad == any(graph.needs_grad[o.name]) for o in lay.outputs)
    # every parameter counted once, a tied one at its first layer
    params = sum(p.numel() * p.element_size() for p in w.model.parameters())
    assert sum(lay.param_bytes for lay in prof.layers) == params
    assert all(f > 0 for lay in prof.layers for f in lay.fwd_ms)
    assert all(lay.saved_bytes[1] >= lay.saved_bytes[0] for lay in prof.layers)


@pytest.mark.parametrize("name", list(GRAPH_MODELS))
def test_layers_add_up_to_the_whole_pass(name: str) -> None:
    """Within one pass the layers' spans are disjoint parts of the pass (the rest: cut nodes and
    hooks), so their sum is at most the pass exactly; medians over passes would only hold it
    up to this host's noise (sum of medians against median of sums)."""
    w = build_graph_model(name, batch=2)
    w.model.train()
    graph = trace_model(w.model, w.sample)
    inputs = graph.inputs_of(*as_call(w.sample))
    for _ in range(2):
        t = time_graph_layers(graph, inputs, Clock(torch.device("cpu")), warmup=1, repeat=1)
        layers = sum(t.fwd_ms) + sum(t.bwd_ms)
        whole = t.pass_fwd_ms + t.pass_bwd_ms
        assert 0.6 * whole <= layers <= whole
    prof = profiled(name)
    assert all(lay.bwd_ms[-1] > 0 for lay in prof.layers[1:])


def test_tied_head_of_gpt2() -> None:
    prof = profiled("tiny-gpt2")
    (tie,) = prof.tied
    assert tie.layers == (0, prof.num_layers - 1) and tie.bytes == 128 * 32 * 4
    assert prof.layers[-1].param_bytes < tie.bytes  # the head's weight is counted at layer 0


def test_dict_sample_with_an_attention_mask() -> None:
    prof = profiled("tiny-bert")
    assert set(prof.input["kwargs"]) == {"input_ids", "attention_mask"}  # type: ignore[index]
    assert prof.input["kwargs"]["attention_mask"]["shape"] == [16]  # type: ignore[index]


def test_the_model_is_left_as_it_was() -> None:
    w = build_graph_model("tiny-unet", batch=2)
    w.model.eval()
    w.model.ups[0].train()  # a mixed mode survives too
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    rng = torch.get_rng_state()
    prof = profile_graph(w.model, w.sample, (1, 3), repeats=1, warmup=0)
    assert prof.microbatch_sizes == (1, 3)  # rows taken cyclically past the sample's 2
    after = w.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm buffers included
    assert all(p.grad is None for p in w.model.parameters())
    assert not w.model.training and w.model.ups[0].training and not w.model.downs[0].training
    assert torch.equal(torch.get_rng_state(), rng)


def test_profile_model_sends_graphs_to_the_graph_profiler_and_plans() -> None:
    w = build_graph_model("tiny-unet", batch=2)
    prof = profile_model(w.model, w.sample, [1, 2], "cpu", warmup=0, repeat=1, max_layers=6)
    assert prof.num_layers == 6 and prof.extra["trace"]["max_layers"] == 6
    with pytest.raises(ValueError, match="timed only inside passes of the whole model"):
        profile_model(w.model, w.sample, [1], "cpu", timing="layer")
    with pytest.raises(ValueError, match=r"an nn\.Sequential is profiled child by child"):
        profile_model(nn.Sequential(nn.Linear(2, 2)), torch.ones(2, 2), [1], leaves=["0"])
    sol = partition_graph(CostModel(prof, 2, 2, stages=2), time_limit_s=20)
    assert sol.status == "optimal"


def test_bad_arguments_name_the_fix() -> None:
    w = build_graph_model("tiny-unet", batch=2)
    with pytest.raises(ValueError, match=r"micro-batch sizes \[0\] must be whole numbers"):
        profile_graph(w.model, w.sample, [0])
    with pytest.raises(ValueError, match="needs threads=1"):
        profile_graph(w.model, w.sample, [1], threads=2, clock="thread")


def test_split_backward_of_gpt2_defers_its_conv1d_and_tied_head() -> None:
    """GPT-2's Conv1D (addmm) and its LM head, a linear on the tied embedding weight, defer their
    weight gradients: W > 0 in every block and the head, 0 in the embedding; I + W near B."""
    prof = profiled("tiny-gpt2")
    for lay in prof.layers:
        assert lay.bwd_input_ms is not None and lay.bwd_weight_ms is not None
        assert all(math.isfinite(t) and t >= 0 for t in lay.bwd_input_ms + lay.bwd_weight_ms)
    assert prof.layers[0].bwd_weight_ms == (0.0, 0.0)
    assert all(w > 0 for lay in prof.layers[1:] for w in lay.bwd_weight_ms or ())
    split = sum(sum(lay.bwd_input_ms or ()) + sum(lay.bwd_weight_ms or ())
                for lay in prof.layers)
    fused = sum(sum(lay.bwd_ms) for lay in prof.layers)
    assert 0.5 * fused <= split <= 2.5 * fused, (split, fused)  # test_profiler.SPLIT_BOUND
    harness = prof.extra["harness"]
    assert len(harness["pass_bwd_input_ms"]) == len(harness["pass_bwd_weight_ms"]) == 2
    assert "split backward" in prof.how


def test_what_w_keeps_and_the_loss_predict_a_graph_stage() -> None:
    """Tiny GPT-2 on two stages: the graph profile says what each layer's deferred linears keep
    from I until W (``held_for_w_bytes``) and what the loss keeps (``loss``, from the model's
    output), and the predicted activation peak of each stage under GPipe, 1F1B and ZB-H1 is
    within 2% of what it held (a stage's sum counts shared values twice). Without what W keeps
    the graph, held until W, over-predicts ZB-H1's last stage by more than 10%; without the
    loss, GPipe's is short by its log-softmax."""
    import copy
    import dataclasses

    from executor import Pipeline, manual_plan
    from partitioner.simulator.engine import simulate
    from tests.graph_cases import balanced_nodes

    batch, m = 8, 2
    w = build_graph_model("tiny-gpt2", batch=batch)
    prof = profile_graph(copy.deepcopy(w.model), w.sample, (2, 4), repeats=1, warmup=0,
                         loss=(w.loss_fn, w.target))
    assert prof.loss is not None and prof.loss.saved_bytes[1] > 0
    assert all(lay.held_for_w_bytes is not None for lay in prof.layers)
    assert profile_from_dict(profile_to_dict(prof)) == prof
    no_w = dataclasses.replace(prof, layers=tuple(dataclasses.replace(
        lay, held_for_w_bytes=None, held_for_w_input_bytes=None) for lay in prof.layers))
    no_loss = dataclasses.replace(prof, loss=None)
    nodes = balanced_nodes(prof.num_layers, 2)
    for schedule, recompute in (("gpipe", "never"), ("1f1b", "never"), ("zb-h1", "never"),
                                ("zb-h1", "always")):
        pipe = Pipeline(copy.deepcopy(w.model), manual_plan(None, m, batch, schedule, recompute,
                                                            nodes=nodes))
        pipe.train_step(w.sample, w.target, w.loss_fn)
        assert pipe.last_timeline is not None
        held = pipe.last_timeline.meta["stage_activation_peak_bytes"]
        pred, without_w, without_loss = (
            simulate(CostModel(p, batch, m, stages=2, schedule=schedule,  # type: ignore[arg-type]
                               recompute=recompute),  # type: ignore[arg-type]
                     nodes=nodes, record=False).stage_activation_peak_bytes
            for p in (prof, no_w, no_loss))
        case = (schedule, recompute, held, pred)
        assert list(pred) == pytest.approx(held, rel=0.02), case
        if schedule == "zb-h1":
            assert without_w[1] > 1.1 * held[1], (case, without_w)
        if schedule == "gpipe":
            assert without_loss[1] < 0.95 * held[1], (case, without_loss)
