"""Train a plan with one rank per schedule row and replica: under torchrun, or on local CPU ranks.

    summaries = launch("executor.workloads.jobs:demo", "plan.json", steps=5, metrics="m.jsonl")
    # no torchrun: R x D local CPU ranks (gloo, 127.0.0.1); under torchrun: this process's rank

``partition-model run`` is the command behind it (``torchrun --nproc-per-node R*D -m
partitioner.cli run ...`` on GPUs or nodes; R = K / V ranks per pipeline, V the plan's stages
per rank, D its replicas). The job names a function returning a ``Job``: the layers as a
factory (each rank builds only its own range), the number of layers, the data and the loss.
Every rank draws the same global batch; each replica trains on its share. With ``trace`` rank
0 writes a measured timeline of its pipeline: of the last 5 steps, the one of median length (in
the simulator's Chrome trace format, so ``partition-model compare`` reads it). With
``metrics`` the rank of replica 0's last stage writes one JSON line per step: ``step``,
``loss`` (of the global batch), ``step_ms`` (its whole step, optimizer included),
``pipeline_ms`` (the pipelined ``train_step`` alone, the replicas' all-reduce included) and
``samples`` (B).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from executor.distributed.checkpoint import check_checkpoint, load_checkpoint, save_checkpoint
from executor.distributed.runner import DistributedRunner
from executor.distributed.spawn import spawn_local
from executor.runtime.allocator import keep_freed_memory
from executor.runtime.job import load_job
from executor.runtime.pipeline import executable_ranges
from partitioner.formats.plan import load_plan
from partitioner.formats.timeline import Timeline, save_chrome_trace

__all__ = ["TRACED_STEPS", "Checkpointing", "choose_device", "launch", "run_rank",
           "under_torchrun"]

#: with ``trace``: the last steps whose timelines are recorded; the median one is written
TRACED_STEPS = 5


@dataclass(frozen=True)
class Checkpointing:
    """Save a checkpoint under ``directory`` (None: none) after every ``every``-th step;
    ``resume``: a checkpoint, or a folder of them (the newest committed one), to go on from."""

    directory: str | None = None
    every: int = 1
    resume: str | None = None
    verified: bool = False  # the resumed checkpoint's files were checked (by ``launch``)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoint every {self.every} steps: give N >= 1 "
                             f"(--checkpoint-every)")


def run_rank(job_spec: str, plan_path: str, steps: int, trace: str | None,
             device: str | None, timeout_s: float, progress: bool = False,
             keep_memory: bool = True, metrics: str | None = None,
             shard_optimizer: bool | None = None, checkpoint: Checkpointing | None = None
             ) -> dict[str, Any]:
    """Train ``steps`` steps on this rank (the process group is up); a summary of the rank:
    its losses (last stage), the wall time of each whole step (``step_ms``, optimizer
    included) and of each pipelined ``train_step`` alone (``pipeline_ms``). With ``progress``
    the last stage shows a progress bar with the loss; otherwise it prints a line per step.
    ``trace``: rank 0 records the last ``TRACED_STEPS`` steps' timelines and writes the one
    of median length (one step alone can be an outlier on a shared machine). ``keep_memory``:
    set this process's allocator to keep freed memory (``executor.runtime.allocator``).
    ``metrics``: the JSON-lines file replica 0's last stage writes (see the module doc);
    ``shard_optimizer``: ZeRO-1 over each stage's replicas (None: as the plan says).
    ``checkpoint``: where to save every N steps and what to resume from
    (``executor.distributed.checkpoint``); a resumed run continues at the checkpoint's step,
    ``steps`` counting from the run's start, and its metrics file is appended to."""
    if keep_memory:
        keep_freed_memory()
    job, plan = load_job(job_spec), load_plan(plan_path)
    runner = DistributedRunner(job.layers, plan, num_layers=job.num_layers, device=device,
                               timeout_s=timeout_s, sample=job.sample, weights=job.weights)
    make = job.optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.01))
    optimizer = runner.make_optimizer(make, shard_optimizer)
    last = plan.num_stages - 1 in runner.stage_indices
    speaks = last and runner.replica == 0  # one rank reports for all replicas
    ckpt = checkpoint or Checkpointing()
    first = load_checkpoint(ckpt.resume, runner, optimizer, verify=not ckpt.verified) if (
        ckpt.resume) else 0
    losses: list[float] = []
    step_ms: list[float] = []
    pipeline_ms: list[float] = []
    traced: list[Timeline] = []
    with contextlib.ExitStack() as closing:  # the log and the bar end with the run, or its error
        bar = closing.enter_context(tqdm(total=steps, initial=first, desc="training",
                                         unit="step")) if progress and speaks else None
        log = closing.enter_context(open(metrics, "a" if first else "w", encoding="utf-8")) if (
            metrics is not None and speaks) else None
        for step in range(first, steps):
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
                if log is not None:
                    log.write(json.dumps({"step": step, "loss": losses[-1],
                                          "step_ms": step_ms[-1], "pipeline_ms": pipeline_ms[-1],
                                          "samples": plan.global_batch}) + "\n")
                    log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", ms=f"{step_ms[-1]:.0f}")
                    bar.update()
                elif speaks:
                    print(f"step {step}: loss {losses[-1]:.5f} ({step_ms[-1]:.1f} ms)", flush=True)
            if result.timeline is not None:
                traced.append(result.timeline)
            if ckpt.directory is not None and (step + 1) % ckpt.every == 0:
                save_checkpoint(ckpt.directory, step + 1, runner, optimizer, plan)
    if traced and trace is not None and runner.replica == 0:
        save_chrome_trace(sorted(traced, key=lambda t: t.step_ms)[(len(traced) - 1) // 2], trace)
    return {"rank": runner.rank, "replica": runner.replica, "stages": runner.stage_indices,
            "first_step": first, "losses": losses, "step_ms": step_ms,
            "pipeline_ms": pipeline_ms}


def under_torchrun() -> bool:
    """Whether torchrun started this process (its rendezvous variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def choose_device(choice: str) -> str | None:
    """``plan``: the plan's device for the stage (None); ``auto``: cuda:LOCAL_RANK if CUDA,
    else cpu; anything else is the device itself."""
    if choice == "plan":
        return None
    if choice == "auto":
        cuda = torch.cuda.is_available()
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    return choice


def launch(job_spec: str, plan_path: str, steps: int = 10, *, trace: str | None = None,
           device: str = "auto", timeout_s: float = 60.0, threads: int = 1,
           progress: bool = False, keep_memory: bool = True, metrics: str | None = None,
           shard_optimizer: bool | None = None, checkpoint: Checkpointing | None = None
           ) -> list[dict[str, Any]]:
    """Train the plan: under torchrun on this process's rank (its summary alone), otherwise
    on R x D spawned local CPU ranks, one per row of the plan's schedule and replica (every
    rank's summary, in global rank order). The plan and the job are checked before any rank
    starts; ``metrics``, ``shard_optimizer`` and ``checkpoint``: see ``run_rank``."""
    if steps < 1:
        raise ValueError(f"steps={steps}: train at least one step")
    plan = load_plan(plan_path)
    job = load_job(job_spec)  # fail here, before starting any rank
    if not job.is_graph:  # a traced model's plan is checked by each rank, before any work
        assert job.num_layers is not None
        executable_ranges(plan, job.num_layers)
    if checkpoint is not None and checkpoint.resume is not None and not under_torchrun():
        check_checkpoint(checkpoint.resume)  # a missing or damaged one: before any rank starts
        checkpoint = replace(checkpoint, verified=True)  # (under torchrun: rank 0, in load)
    chosen = choose_device(device)
    if under_torchrun():
        backend = "nccl" if chosen is not None and chosen.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        try:
            return [run_rank(job_spec, plan_path, steps, trace, chosen, timeout_s, progress,
                             keep_memory, metrics, shard_optimizer, checkpoint)]
        finally:
            dist.destroy_process_group()
    if device not in ("auto", "cpu"):
        raise ValueError(f"device {device!r}: without torchrun the ranks are local CPU "
                         f"processes; use --device cpu, or launch with torchrun")
    world = plan.build_schedule().ranks * plan.replicas
    return spawn_local(run_rank, world, (job_spec, plan_path, steps, trace, "cpu", timeout_s,
                                         progress, keep_memory, metrics, shard_optimizer,
                                         checkpoint),
                       threads=threads, timeout_s=timeout_s)
