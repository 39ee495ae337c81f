"""Calibrate the cost model on this machine: the link between two local ranks, and how the
executor's actions relate to the profile.

    >>> link = measure_link(sizes_bytes=(4096, 1 << 20), repeats=5)   # doctest: +SKIP
    >>> link.bandwidth_gbps, link.latency_ms                          # doctest: +SKIP
    (1.9, 0.08)
    >>> measure_runtime("executor.jobs:translation", profile, 16, link=link)  # doctest: +SKIP
    Runtime(compute_scale=1.08, action_ms=0.04)

Two ranks (gloo on 127.0.0.1, as the distributed runner uses) bounce a buffer of each size;
half a round trip is one transfer. A line through (bytes, ms), fitted on relative errors,
gives ``latency_ms`` (intercept) and ``bandwidth_gbps`` (inverse slope): the cost model's
``latency + bytes / bandwidth``.

``measure_runtime`` runs a short trial of the pipeline (K=2 local ranks, the distributed
runner, a few steps at a few M) and compares each measured forward and backward action with
its layers' profiled sum: the line through those points is the cost model's ``Runtime``
(``compute_scale`` x profiled + ``action_ms``). Layers profiled one at a time run with hot
caches; inside a pipeline they do not, and each action pays the runtime's dispatch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from partitioner.costs import CostModel, Link, Recompute, Runtime
from partitioner.durations import stage_durations, stage_of_ranges
from partitioner.plan import save_plan
from partitioner.planner import make_plan
from partitioner.profile import Profile
from partitioner.simulate import ranges_from_boundaries

from .spawn import spawn_local

__all__ = ["Trial", "fit_link", "fit_runtime", "measure_link", "measure_runtime", "run_trials"]

DEFAULT_SIZES = (4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20)


def _ping_pong(sizes_bytes: Sequence[int], repeats: int) -> list[float]:
    """On each of two ranks: the median one-way time (ms) of each size."""
    rank = dist.get_rank()
    peer = 1 - rank
    out = []
    for n_bytes in sizes_bytes:
        buf = torch.zeros(max(1, n_bytes // 4), dtype=torch.float32)
        times = []
        for r in range(repeats + 2):  # two warm-up rounds
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)
            if r >= 2:
                times.append((time.perf_counter() - start) * 1e3 / 2)
        out.append(statistics.median(times))
    return out


def _relative_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Slope and intercept of the line through (x, y), each point weighing 1 / y (relative
    errors); refitted through the origin when the intercept or the slope comes out negative."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    w = 1.0 / np.maximum(y, 1e-9)
    slope, intercept = np.polyfit(x, y, 1, w=w)
    if intercept < 0 or slope <= 0:
        slope, intercept = float(np.dot(w * w * x, y) / np.dot(w * w * x, x)), 0.0
    return float(slope), float(intercept)


def fit_link(sizes_bytes: Sequence[float], times_ms: Sequence[float]) -> Link:
    """The line ``latency + bytes / bandwidth`` through measured points, fitted on relative
    errors (each point weighs as 1 / its time), so the small messages, which are latency,
    set the latency and a noisy large transfer cannot swing it; the latency is kept >= 0 and
    the bandwidth finite and positive.

        >>> fit_link([1e6, 2e6, 3e6], [1.5, 2.5, 3.5])
        Link(bandwidth_gbps=1.0, latency_ms=0.5)
    """
    if len(sizes_bytes) != len(times_ms) or len(sizes_bytes) < 2:
        raise ValueError(f"need at least two (size, time) points of equal count, got "
                         f"{len(sizes_bytes)} sizes and {len(times_ms)} times")
    slope, intercept = _relative_line(sizes_bytes, times_ms)
    slope = max(slope, 1e-12)
    return Link(bandwidth_gbps=round(1.0 / (slope * 1e6), 6), latency_ms=round(float(intercept), 6))


def measure_link(sizes_bytes: Sequence[int] = DEFAULT_SIZES, repeats: int = 10,
                 threads: int = 1, timeout_s: float = 60.0) -> Link:
    """Spawn two local CPU ranks, time transfers of each size, and fit a Link."""
    if any(n <= 0 for n in sizes_bytes) or len(set(sizes_bytes)) < 2:
        raise ValueError(f"sizes_bytes={list(sizes_bytes)}: give at least two distinct positive "
                         f"sizes")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    per_rank = spawn_local(_ping_pong, 2, args=(list(sizes_bytes), repeats), threads=threads,
                           timeout_s=timeout_s, deadline_s=timeout_s * 2)
    return fit_link(list(sizes_bytes), per_rank[0])


def fit_runtime(profiled_ms: Sequence[float], measured_ms: Sequence[float]) -> Runtime:
    """The line ``measured = compute_scale * profiled + action_ms`` through (profiled,
    measured) action times, fitted on relative errors as ``fit_link`` does; ``action_ms`` is
    kept >= 0 (else the line is refitted through the origin).

        >>> fit_runtime([1.0, 2.0, 4.0], [1.3, 2.5, 4.9])
        Runtime(compute_scale=1.2, action_ms=0.1)
    """
    if len(profiled_ms) != len(measured_ms) or len(profiled_ms) < 2:
        raise ValueError(f"need at least two (profiled, measured) pairs of equal count, got "
                         f"{len(profiled_ms)} and {len(measured_ms)}")
    if not (min(profiled_ms) > 0 and min(measured_ms) > 0
            and max(profiled_ms) > min(profiled_ms)):
        raise ValueError("profiled and measured times must be > 0, with at least two distinct "
                         "profiled times")
    slope, intercept = _relative_line(profiled_ms, measured_ms)
    return Runtime(compute_scale=round(float(slope), 6), action_ms=round(float(intercept), 6))


@dataclass(frozen=True)
class Trial:
    """One plan's trial on one rank: the wall time of each timed step (from a barrier to
    the end of ``train_step``) and, when recorded, the median time of each of the stages'
    F and B actions, keyed (stage, kind, micro-batch) (rank 0 only; empty elsewhere)."""

    step_ms: list[float]
    action_ms: dict[tuple[int, str, int], float]


def run_trials(job_spec: str, plan_paths: Sequence[str], warmup: int, steps: int,
               record: bool = False) -> list[Trial]:
    """On every rank of the process group: train each plan for ``warmup + steps`` steps of
    ``job_spec`` (gradients cleared, no optimizer step), timing the last ``steps``. With
    ``record`` the runner's timelines are gathered on rank 0 (which costs the step a gather)."""
    from .distributed import DistributedRunner
    from .launch import load_job

    job = load_job(job_spec)
    out = []
    for path in plan_paths:
        runner = DistributedRunner(job.layers, path, num_layers=job.num_layers, device="cpu",
                                   timeout_s=120.0)
        params = runner.parameters()
        walls: list[float] = []
        actions: dict[tuple[int, str, int], list[float]] = {}
        for step in range(warmup + steps):
            inputs, targets = job.batch(step, runner.plan.global_batch)
            for p in params:
                p.grad = None
            dist.barrier()
            start = time.perf_counter()
            result = runner.train_step(inputs, targets, job.loss_fn, timeline=record)
            walls.append((time.perf_counter() - start) * 1e3)
            if result.timeline is not None and step >= warmup:
                for e in result.timeline.events:
                    if e.action.kind in ("F", "B"):
                        key = (e.action.stage, e.action.kind, e.action.microbatch)
                        actions.setdefault(key, []).append(e.duration_ms)
        out.append(Trial(walls[warmup:], {k: statistics.median(v) for k, v in actions.items()}))
    return out


def measure_runtime(job: str, profile: Profile, global_batch: int, *, link: Link | None = None,
                    microbatches: Sequence[int] = (1, 4), recompute: Recompute = "never",
                    steps: int = 4, warmup: int = 2, threads: int = 1,
                    timeout_s: float = 300.0) -> Runtime:
    """Fit the executor's ``Runtime`` from a trial run of ``job`` (a ``module:function``
    spec, see ``executor.launch``; ``profile`` is its model's profile) on two local CPU
    ranks: for each M in ``microbatches``, the exact K=2 plan runs ``warmup + steps`` steps,
    and every stage's median F and B time is paired with its profiled sum (the same
    micro-batch size, before any runtime correction)."""
    import tempfile
    from pathlib import Path

    from .launch import load_job

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    layers = load_job(job).num_layers
    if layers != profile.num_layers:
        raise ValueError(f"job {job!r} has {layers} layers but profile {profile.model!r} has "
                         f"{profile.num_layers}; give the profile of the job's model")
    models = [CostModel(profile, global_batch, m, stages=2, recompute=recompute,
                        link=link or Link(float("inf"), 0.0)) for m in microbatches]
    plans = [make_plan(cm, devices=["cpu", "cpu"]) for cm in models]
    with tempfile.TemporaryDirectory(prefix="gpipe-calibrate-") as tmp:
        paths = [str(Path(tmp) / f"trial-{i}.json") for i in range(len(plans))]
        for plan, path in zip(plans, paths, strict=True):
            save_plan(plan, path)
        per_rank = spawn_local(run_trials, 2, (job, paths, warmup, steps, True), threads=threads,
                               timeout_s=timeout_s, deadline_s=timeout_s * 2)
    measured = [trial.action_ms for trial in per_rank[0]]
    xs, ys = [], []
    for cm, plan, meas in zip(models, plans, measured, strict=True):
        ranges = ranges_from_boundaries(plan.boundaries)
        dur = stage_durations(cm, stage_of_ranges(ranges), [0, 1])
        for (k, kind, i), ms in sorted(meas.items()):
            predicted = (dur.fwd_ms if kind == "F" else dur.bwd_ms)[k][dur.size_index[i]]
            if predicted > 0:
                xs.append(predicted)
                ys.append(ms)
    return fit_runtime(xs, ys)


def main(argv: Sequence[str] | None = None) -> int:
    """``partition-model calibrate``: measure the link and fit the runtime on two local ranks,
    and print them as the options ``plan``, ``search`` and ``simulate`` take."""
    import argparse
    import json

    from partitioner.profile import load_profile

    p = argparse.ArgumentParser(
        prog="partition-model calibrate",
        description="Measure this machine's link between two local CPU ranks (gloo) and fit "
                    "the executor's runtime from a short trial of the job's pipeline; prints "
                    "the options that make plan/search/simulate predict this machine.")
    p.add_argument("--job", required=True, metavar="MODULE:FUNCTION",
                   help="the training job (an executor.launch.Job), e.g. "
                        "executor.jobs:translation")
    p.add_argument("--profile", required=True, metavar="PATH|NAME",
                   help="the profile of the job's model (partition-model profile)")
    p.add_argument("--global-batch", "-B", type=int, required=True, help="samples per step")
    p.add_argument("--microbatches", default="1,4",
                   help="M of the trial runs (default 1,4: two micro-batch sizes)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per trial (default 4)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        ms = [int(x) for x in args.microbatches.split(",")]
    except ValueError:
        p.error(f"--microbatches {args.microbatches!r} is not a comma-separated list of whole "
                f"numbers, e.g. 1,4")
    bad = [m for m in ms if not 1 <= m <= args.global_batch]
    if bad or args.global_batch < 1:
        p.error(f"--microbatches {args.microbatches}: every M must be 1..B (B="
                f"{args.global_batch}); the trial needs a sample per micro-batch")
    profile = load_profile(args.profile)
    link = measure_link()
    runtime = measure_runtime(args.job, profile, args.global_batch, link=link,
                              microbatches=ms, steps=args.steps)
    if args.json:
        print(json.dumps({"bandwidth_gbps": link.bandwidth_gbps, "latency_ms": link.latency_ms,
                          "compute_scale": runtime.compute_scale,
                          "action_ms": runtime.action_ms}))
    else:
        print(f"link: {link.bandwidth_gbps:g} GB/s + {link.latency_ms:g} ms per message; "
              f"actions take {runtime.compute_scale:g} x profiled + {runtime.action_ms:g} ms")
        print(f"--bandwidth {link.bandwidth_gbps:g} --latency-ms {link.latency_ms:g} "
              f"--compute-scale {runtime.compute_scale:g} --action-ms {runtime.action_ms:g}")
    return 0
