"""Section (c): what the local runner costs over a plain PyTorch loop on the same device.

    python tools/gpu_check.py --out gpu-out --sections overhead

The same model (on a GPU the ``gpt2-medium`` shape, bf16), the same batch (B=16) in the same
M micro-batches: a plain loop (for each micro-batch: forward, loss x b_i / B, backward; the
gradients accumulating) against ``Pipeline(model, plan).train_step`` with K stages all on the
one device under GPipe, no recompute (K=1: the runner's own dispatch, micro-batch cutting and
action recording; K=4: also the in-process messages between stages). Both do exactly the work
of a training step without the optimizer; gradients are set to None before each step of
either, and the two alternate step by step, so both see the same device state. A step is timed
from the host, the device synchronised before and after; the figure is ``overhead = runner /
loop - 1`` of the medians over the rounds (goal: at most ``overhead_goal``, 5%).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from executor.runtime.pipeline import Pipeline, manual_plan
from executor.workloads.models import Workload, build_model
from gpucheck.record import Check, Section, sync
from partitioner.cost.model import split_microbatches

__all__ = ["plain_loop", "run", "summary"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def plain_loop(model: nn.Module, work: Workload, x: torch.Tensor, y: torch.Tensor,
               microbatches: int) -> Callable[[], None]:
    """One training step as a plain loop over the micro-batches (gradient accumulation)."""
    sizes = split_microbatches(x.shape[0], microbatches)
    xs, ys = torch.split(x, sizes), torch.split(y, sizes)
    big_b = x.shape[0]

    def step() -> None:
        for xi, yi in zip(xs, ys, strict=True):
            loss = work.loss_fn(model(xi), yi) * (xi.shape[0] / big_b)
            torch.autograd.backward(loss)
    return step


def _alternate(steps: dict[str, Callable[[], object]], model: nn.Module, device: torch.device,
               rounds: int) -> dict[str, list[float]]:
    """Each step once per round, in turn, after one untimed call of each (warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds + 1):
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if r > 0:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def run(sec: Section, check: Check) -> None:
    s, dev = check.settings, check.device
    work = build_model(s.overhead_model, batch=s.overhead_batch)
    model = work.model.to(device=dev, dtype=DTYPES[s.dtype])
    x, y = work.sample.to(dev), work.target.to(dev)
    fig = sec.figures
    fig.update(model=s.overhead_model, dtype=s.dtype, batch=s.overhead_batch,
               goal=f"runner / loop - 1 <= {s.overhead_goal:g}", rounds=s.overhead_rounds)
    cells: list[dict[str, Any]] = []
    fig["cells"] = cells
    for m in s.overhead_microbatches:
        for stages in s.overhead_stages:
            what = f"M={m} K={stages}"
            if not sec.fits(what, s.estimate("overhead cell"), "cell"):
                continue
            with sec.timing("cell"):
                cuts = [round(k * len(model) / stages) for k in range(stages + 1)]
                pipe = Pipeline(model, manual_plan(cuts, m, s.overhead_batch, "gpipe", "never",
                                                   [str(dev)] * stages))
                def runner(p: Pipeline = pipe) -> None:
                    p.train_step(x, y, work.loss_fn)

                times = _alternate({"loop": plain_loop(model, work, x, y, m), "runner": runner},
                                   model, dev, s.overhead_rounds)
                loop_ms, runner_ms = (statistics.median(times[k]) for k in ("loop", "runner"))
                overhead = runner_ms / loop_ms - 1
                cells.append({"microbatches": m, "stages": stages, "loop_ms": loop_ms,
                              "runner_ms": runner_ms, "loop_min_ms": min(times["loop"]),
                              "runner_min_ms": min(times["runner"]), "overhead": overhead,
                              "within_goal": overhead <= s.overhead_goal})
    model.zero_grad(set_to_none=True)
    fig["max_overhead"] = max((c["overhead"] for c in cells), default=None)
    fig["all_within_goal"] = bool(cells) and all(c["within_goal"] for c in cells)


def summary(fig: dict[str, Any]) -> str:
    """One line: the runner's overhead per (M, K) cell against the goal."""
    cells = ", ".join(f"M={c['microbatches']} K={c['stages']} {100 * c['overhead']:+.1f}%"
                      for c in fig.get("cells", []))
    held = "held" if fig.get("all_within_goal") else "NOT held"
    return f"runner over loop: {cells or 'no cell'} ({fig.get('goal', '')}: {held})"
