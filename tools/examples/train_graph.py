"""Bring a model that is not an nn.Sequential: trace it, profile it, plan it, train it on two ranks.

    python tools/examples/train_graph.py --model tiny-llama         # Transformers' Llama
    python tools/examples/train_graph.py --model tiny-unet          # a U-Net with long skips

The five steps, all library calls (``partition-model profile``, ``partition-model`` and
``partition-model run --job executor.workloads.graphjobs:tiny_llama`` do the same from the
command line):

1. build the model (here a tiny example from ``executor.workloads.graphmodels``);
2. ``profile_model``: traced into layers (its repeated blocks, and the code between them),
   each layer timed inside whole forward+backward passes, with the bytes of every value that
   crosses between layers;
3. ``make_plan(..., solver="auto")``: CP-SAT's convex partition of the layer graph into K=2
   stages (the graph has skips: the U-Net's encoder outputs, Llama's mask and rotary tables);
4. ``save_weights``: the model's weights, which each rank loads only its stage's part of;
5. two local ranks (gloo), each building the model on the meta device and running its stage
   with ``DistributedRunner``: values cross straight from the stage that makes them to the
   stages that read them. Prints the loss of every step; it falls.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from executor import DistributedRunner, profile_model, spawn_local
from executor.graphs.weights import save_weights
from executor.workloads.graphmodels import GRAPH_MODELS, build_graph_model
from partitioner import CostModel, make_plan, save_plan
from partitioner.report.plans import plan_report


def train_rank(name: str, plan_path: str, weights: str, steps: int, batch: int) -> list[float]:
    """One rank: its stage of the plan, trained for ``steps`` steps on a few fixed batches."""
    with torch.device("meta"):  # no memory, no initialisation: the stage's part is loaded
        model = build_graph_model(name, batch=1).model
    sample = build_graph_model(name, batch=2).sample
    runner = DistributedRunner(model, plan_path, sample=sample, weights=weights)
    optimizer = torch.optim.Adam(runner.parameters(), lr=3e-3)
    data = [build_graph_model(name, batch=batch, seed=1 + i) for i in range(2)]
    losses = []
    for step in range(steps):
        w = data[step % len(data)]
        optimizer.zero_grad()
        result = runner.train_step(w.sample, w.target, w.loss_fn)
        optimizer.step()
        if result.loss is not None:
            losses.append(float(result.loss))
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama", choices=sorted(GRAPH_MODELS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=4)
    args = p.parse_args()
    b, m = args.global_batch, args.microbatches
    w = build_graph_model(args.model, batch=b)
    profile = profile_model(w.model, w.sample, sorted({-(-b // m), b // m}), "cpu", threads=1,
                            name=args.model)
    print(f"{args.model}: traced into {profile.num_layers} layers, "
          f"{len(profile.edges or ())} edges")
    cm = CostModel(profile, b, m, stages=2)
    plan = make_plan(cm, devices=["cpu", "cpu"], solver="auto")
    print(plan_report(plan, cm))
    with tempfile.TemporaryDirectory() as tmp:
        plan_path, weights = str(Path(tmp) / "plan.json"), str(Path(tmp) / "weights.pt")
        save_plan(plan, plan_path)
        save_weights(w.model, weights)
        per_rank: list[Any] = spawn_local(train_rank, 2, (args.model, plan_path, weights,
                                                          args.steps, b), timeout_s=120)
    losses = per_rank[-1]
    for step, loss in enumerate(losses):
        print(f"step {step}: loss {loss:.4f}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps on 2 ranks")


if __name__ == "__main__":
    main()
