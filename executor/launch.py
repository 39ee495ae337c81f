"""Train a plan with one rank per stage: under torchrun, or on local CPU ranks it spawns itself.

    torchrun --nproc-per-node 2 -m executor.launch --job executor.launch:demo_job --plan plan.json
    python -m executor.launch --job executor.launch:demo_job --plan plan.json --steps 5 \\
        --trace measured.json        # no torchrun: spawns K local CPU ranks (gloo, 127.0.0.1)

``--job module:function`` names a function returning a ``Job``: the layers as a factory (each
rank builds only its own range), the number of layers, the data and the loss. Rank 0 writes a
measured timeline with ``--trace``: of the last 5 steps, the one of median length (in the
simulator's Chrome trace format, so ``partition-model compare PREDICTED MEASURED`` reads it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from partitioner.plan import PlanError, load_plan
from partitioner.timeline import Timeline, save_chrome_trace

from .distributed import DistributedRunner
from .interpreter import LossFn
from .microbatch import Batch
from .spawn import RankFailure, spawn_local
from .stage import LayerSource

__all__ = ["Job", "demo_job", "load_job", "main", "run_rank"]

#: with ``--trace``: the last steps whose timelines are recorded; the median one is written
TRACED_STEPS = 5


@dataclass(frozen=True)
class Job:
    """What every rank needs to train: ``layers`` (a factory: ``f(i)`` or ``f(start, end)``),
    ``num_layers``, ``batch(step, B) -> (inputs, targets)`` (the same on every rank; only the
    first rank's inputs and the last rank's targets are used), ``loss_fn(output, targets)``
    (mean over the batch) and ``optimizer(params)`` (default SGD, lr 0.01)."""

    layers: LayerSource
    num_layers: int
    batch: Callable[[int, int], tuple[Batch, Batch]]
    loss_fn: LossFn
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None


def _demo_layer(i: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100 + i)
        widths = [(16, 64), None, (64, 64), None, (64, 64), None, (64, 1)]
        shape = widths[i]
        return nn.Linear(*shape) if shape else nn.GELU()


def _demo_batch(step: int, batch: int) -> tuple[Batch, Batch]:
    g = torch.Generator().manual_seed(step % 4)  # a small pool of batches, seen again and again
    x = torch.randn(batch, 16, generator=g)
    return x, torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]


def demo_job() -> Job:
    """A 7-layer MLP regressing a smooth function of random inputs (a demo that runs anywhere)."""
    return Job(_demo_layer, 7, _demo_batch, nn.functional.mse_loss,
               lambda params: torch.optim.Adam(params, lr=3e-3))


def load_job(spec: str) -> Job:
    """The Job returned by ``module:function``."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"--job {spec!r} is not of the form module:function "
                         f"(e.g. executor.launch:demo_job)")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--job {spec!r}: cannot load it ({exc}); the module must be importable "
                         f"(on PYTHONPATH) and define the function") from None
    job = func()
    if not isinstance(job, Job):
        raise TypeError(f"--job {spec!r} returned {type(job).__name__}, not an executor.launch.Job")
    return job


def run_rank(job_spec: str, plan_path: str, steps: int, trace: str | None,
             device: str | None, timeout_s: float, progress: bool = False) -> dict[str, Any]:
    """Train ``steps`` steps on this rank (the process group is up); a summary of the rank:
    its losses (last stage), the wall time of each whole step (``step_ms``, optimizer
    included) and of each pipelined ``train_step`` alone (``pipeline_ms``). With ``progress``
    the last stage shows a progress bar with the loss; otherwise it prints a line per step.
    ``trace``: rank 0 records the last ``TRACED_STEPS`` steps' timelines and writes the one
    of median length (one step alone can be an outlier on a shared machine)."""
    job, plan = load_job(job_spec), load_plan(plan_path)
    runner = DistributedRunner(job.layers, plan, num_layers=job.num_layers, device=device,
                               timeout_s=timeout_s)
    params = runner.parameters()
    make = job.optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.01))
    optimizer = make(params) if params else None
    last = runner.index == plan.num_stages - 1
    bar = tqdm(total=steps, desc="training", unit="step") if progress and last else None
    losses: list[float] = []
    step_ms: list[float] = []
    pipeline_ms: list[float] = []
    traced: list[Timeline] = []
    for step in range(steps):
        inputs, targets = job.batch(step, plan.global_batch)
        start = time.perf_counter()
        if optimizer is not None:
            optimizer.zero_grad()
        begin = time.perf_counter()
        result = runner.train_step(inputs, targets, job.loss_fn,
                                   timeline=trace is not None and step >= steps - TRACED_STEPS)
        pipeline_ms.append((time.perf_counter() - begin) * 1e3)
        if optimizer is not None:
            optimizer.step()
        step_ms.append((time.perf_counter() - start) * 1e3)
        if last and result.loss is not None:
            losses.append(float(result.loss))
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", ms=f"{step_ms[-1]:.0f}")
                bar.update()
            else:
                print(f"step {step}: loss {losses[-1]:.5f} ({step_ms[-1]:.1f} ms)", flush=True)
        if result.timeline is not None:
            traced.append(result.timeline)
    if traced and trace is not None:
        save_chrome_trace(sorted(traced, key=lambda t: t.step_ms)[(len(traced) - 1) // 2], trace)
    if bar is not None:
        bar.close()
    return {"stage": runner.index, "losses": losses, "step_ms": step_ms,
            "pipeline_ms": pipeline_ms}


def under_torchrun() -> bool:
    """Whether torchrun started this process (its rendezvous variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _device(choice: str) -> str | None:
    """``plan``: the plan's device for the stage; ``auto``: cuda:LOCAL_RANK if CUDA, else cpu."""
    if choice == "plan":
        return None
    if choice == "auto":
        cuda = torch.cuda.is_available()
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    return choice


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m executor.launch",
        description="Train a gpipe-plan/1 plan with one rank per stage. Under torchrun each "
                    "process runs its stage; run directly, it spawns K local CPU ranks.")
    p.add_argument("--job", default="executor.launch:demo_job", metavar="MODULE:FUNCTION",
                   help="function returning an executor.launch.Job (default: a demo MLP)")
    p.add_argument("--plan", required=True, help="plan file (gpipe-plan/1 JSON)")
    p.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    p.add_argument("--trace", default=None, metavar="TRACE.json",
                   help="write a measured timeline (Chrome trace) from rank 0: of the last "
                        "5 steps, the one of median length")
    p.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK with CUDA, else cpu), plan (the plan's), or a "
                        "device for every rank")
    p.add_argument("--timeout-s", type=float, default=60.0,
                   help="give up on a silent peer after this long (default 60)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per rank when spawning local ranks (default 1)")
    p.add_argument("--progress", action="store_true",
                   help="show a progress bar with the loss instead of a line per step")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: train at least one step")
    plan = load_plan(args.plan)
    load_job(args.job)  # fail here, before starting any rank
    run_args = (args.job, args.plan, args.steps, args.trace, _device(args.device),
                args.timeout_s, args.progress)
    if under_torchrun():
        device = run_args[4]
        backend = "nccl" if device is not None and device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout_s))
        try:
            run_rank(*run_args)
        finally:
            dist.destroy_process_group()
        return 0
    if args.device not in ("auto", "cpu"):
        raise ValueError(f"--device {args.device}: without torchrun the ranks are local CPU "
                         f"processes; use --device cpu, or launch with torchrun")
    cpu_args = (*run_args[:4], "cpu", *run_args[5:])
    summaries = spawn_local(run_rank, plan.num_stages, cpu_args, threads=args.threads,
                            timeout_s=args.timeout_s)
    last = summaries[-1]
    mean_ms = sum(last["step_ms"]) / len(last["step_ms"])
    print(f"trained {args.steps} steps on {plan.num_stages} local ranks: loss "
          f"{last['losses'][0]:.5f} -> {last['losses'][-1]:.5f}, {mean_ms:.1f} ms per step")
    return 0


def cli() -> int:
    """``main`` with user errors printed (status 2) and failed ranks reported (status 1)."""
    try:
        return main()
    except (ValueError, TypeError, PlanError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RankFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run the copy imported as executor.launch, not this __main__ one: jobs and spawned ranks
    # refer to executor.launch.Job and executor.launch.run_rank by that name.
    from executor import launch

    sys.exit(launch.cli())
