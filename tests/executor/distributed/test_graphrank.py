"""Graph plans on one rank per stage: transparent, meta-device ranks, tied copies kept equal."""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any

import pytest
import torch

from executor.distributed.runner import DistributedRunner
from executor.distributed.spawn import spawn_local
from executor.graphs.layers import trace_model
from executor.graphs.weights import save_weights
from executor.runtime.pipeline import manual_plan
from executor.workloads.graphmodels import build_graph_model
from tests.graph_cases import CASES, balanced_nodes, canonical, grad_problems, plain_step

pytest.importorskip("transformers")

B = 6
MODELS = ("tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-resnet", "tiny-unet")


def _rank(cases: list[tuple[str, int, int, str, str, int]], weights_dir: str) -> list[Any]:
    """Each case's (loss, this rank's gradients by name); the model is built on the meta
    device and only this rank's stage is loaded from the saved weights."""
    out = []
    for name, k, m, recompute, schedule, layers in cases:
        w = build_graph_model(name, batch=B)
        with torch.device("meta"):
            model = build_graph_model(name, batch=2).model
        plan = manual_plan(None, m, B, schedule, recompute, nodes=balanced_nodes(layers, k))
        runner = DistributedRunner(model, plan, sample=build_graph_model(name, batch=2).sample,
                                   weights=os.path.join(weights_dir, f"{name}.pt"))
        res = runner.train_step(w.sample, w.target, w.loss_fn)
        grads = {n: p.grad.detach().clone() for n, p in runner.stage.named_parameters().items()
                 if p.grad is not None}
        out.append((None if res.loss is None else float(res.loss), grads))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_graph_plans_on_ranks_train_as_the_plain_model(k: int) -> None:
    # one (M, recompute, schedule) per model and K, in turn over CASES: the single-process
    # tests run every case; these check the ranks' transport, meta-device loading and ties
    names = ("tiny-unet",) if k == 4 else MODELS
    layers = {n: trace_model(build_graph_model(n, batch=2).model,
                             build_graph_model(n, batch=2).sample, check=False).num_layers
              for n in names}
    cases = [(n, k, *CASES[(j + 3 * (k - 2)) % len(CASES)], layers[n])
             for j, n in enumerate(names)]
    with tempfile.TemporaryDirectory() as tmp:
        refs = {}
        for n in names:
            w = build_graph_model(n, batch=B)
            save_weights(w.model, os.path.join(tmp, f"{n}.pt"))
            refs[n] = w
        results = spawn_local(_rank, k, (cases, tmp), timeout_s=120, deadline_s=540)
    failures = []
    for c, (name, _k, m, rc, sch, _layers) in enumerate(cases):
        w = refs[name]
        loss0, want = plain_step(copy.deepcopy(w.model), w.sample, w.target, w.loss_fn, m)
        loss = results[-1][c][0]
        names = canonical(w.model)
        got = {names[n]: g for rank in results for n, g in rank[c][1].items()}
        problems = grad_problems(got, want)
        if loss is None or abs(loss - loss0) > 1e-5 * abs(loss0) or problems:
            failures.append(f"{name} K={k} M={m} {rc} {sch}: {loss} vs {loss0}; {problems[:3]}")
    assert not failures, "\n".join(failures)


# (schedule, K, steps) on 2 ranks: see the test; the new placements need fewer steps to show it
TIED_CASES = [("1f1b", 2, 4), ("interleaved", 4, 2), ("zbv", 4, 2)]


def _tied_rank(weights: str) -> list[tuple[list[float | None], dict[str, torch.Tensor]]]:
    w = build_graph_model("tiny-gpt2", batch=B)
    layers = trace_model(w.model, w.sample, check=False).num_layers
    out = []
    for schedule, stages, steps in TIED_CASES:
        with torch.device("meta"):
            model = build_graph_model("tiny-gpt2", batch=2).model
        plan = manual_plan(None, 2, B, schedule, nodes=balanced_nodes(layers, stages),
                           stages_per_rank=stages // 2 if schedule == "interleaved" else None)
        runner = DistributedRunner(model, plan, sample=w.sample, weights=weights)
        opt = torch.optim.Adam(runner.parameters(), lr=1e-2)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            res = runner.train_step(w.sample, w.target, w.loss_fn)
            opt.step()
            losses.append(None if res.loss is None else float(res.loss))
        out.append((losses, {n: p.detach().clone() for n, p in runner.named_parameters().items()}))
    return out


@pytest.mark.timeout(300)
def test_tied_copies_get_summed_gradients_and_stay_equal_over_steps() -> None:
    # the token embedding (stage 0) and the LM head (stage K-1) share one weight: under 1F1B
    # and interleaved (V=2: stage 3 on rank 1) each rank holds a copy and the copies'
    # gradients are all-reduced; in the V shape (zbv) stages 0 and 3 are both on rank 0, which
    # holds one parameter for both uses and sums their gradients itself
    w = build_graph_model("tiny-gpt2", batch=B)
    model = w.model
    head, embed = model.lm_head.weight, model.transformer.wte.weight
    assert head is embed  # the tie this test is about
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.pt")
        save_weights(model, path)
        results = spawn_local(_tied_rank, 2, (path,), timeout_s=120, deadline_s=280)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    want, weights = [], []
    for _ in range(max(steps for _, _, steps in TIED_CASES)):
        opt.zero_grad()
        loss = w.loss_fn(model(w.sample, use_cache=False), w.target)
        loss.backward()
        opt.step()
        want.append(float(loss.detach()))
        weights.append(head.detach().clone())
    for c, (schedule, _stages, steps) in enumerate(TIED_CASES):
        got = next(r[c][0] for r in results if r[c][0][0] is not None)
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want[:steps], strict=True)), (
            schedule, got, want)
        copies = [p for r in results for n, p in r[c][1].items() if n in (
            "lm_head.weight", "transformer.wte.weight")]
        assert len(copies) == (1 if schedule == "zbv" else 2), schedule  # one per rank
        assert all(torch.equal(copy_, copies[0]) for copy_ in copies), schedule
        assert torch.allclose(copies[0], weights[steps - 1], rtol=1e-5, atol=1e-6), schedule


def _ordered_graph_rank(layers: int) -> dict[str, Any]:
    from tests.executor.distributed.test_runner import _drop_tags

    log: dict[tuple[str, int, int], list[int]] = {}
    carriers: set[tuple[int, int, tuple[int, ...]]] = set()
    _drop_tags(log, carriers)  # messages match by order alone, as on NCCL
    w = build_graph_model("tiny-unet", batch=B)
    plan = manual_plan(None, 3, B, "1f1b", "always", nodes=balanced_nodes(layers, 3))
    runner = DistributedRunner(w.model, plan, sample=w.sample, transport="ordered")
    res = runner.train_step(w.sample, w.target, w.loss_fn)
    return {"loss": None if res.loss is None else float(res.loss), "carriers": carriers,
            "grads": {n: p.grad.detach().clone() for n, p in
                      runner.stage.named_parameters().items() if p.grad is not None}}


@pytest.mark.timeout(300)
def test_the_ordered_transport_carries_skips_on_their_own_pair_groups() -> None:
    w = build_graph_model("tiny-unet", batch=B)
    layers = trace_model(w.model, w.sample, check=False).num_layers
    ranks = spawn_local(_ordered_graph_rank, 3, (layers,), timeout_s=60, deadline_s=240)
    loss0, want = plain_step(copy.deepcopy(w.model), w.sample, w.target, w.loss_fn, 3)
    got = {n: g for r in ranks for n, g in r["grads"].items()}
    assert not grad_problems(got, want)
    assert abs(ranks[-1]["loss"] - loss0) <= 1e-5 * abs(loss0)
    carriers = set().union(*(r["carriers"] for r in ranks))
    assert (0, 2, (0, 2)) in carriers and (2, 0, (0, 2)) in carriers  # the skip's own pair
