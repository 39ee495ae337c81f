"""Calibrate the cost model on this machine: the link between ranks, and the executor's runtime.

    >>> link = measure_link(sizes_bytes=(4096, 1 << 20), repeats=5)   # doctest: +SKIP
    >>> link.bandwidth_gbps, link.latency_ms                          # doctest: +SKIP
    (1.9, 0.08)
    >>> measure_runtime("executor.workloads.jobs:translation", profile, 16, link=link)  # doctest: +SKIP
    Runtime(compute_scale=1.08, action_ms=0.04)

Two ranks (gloo on 127.0.0.1, as the distributed runner uses) bounce a buffer of each size;
half a round trip is one transfer. A line through (bytes, ms), fitted on relative errors,
gives ``latency_ms`` (intercept) and ``bandwidth_gbps`` (inverse slope): the cost model's
``latency + bytes / bandwidth``.

``measure_all_reduce`` (``executor.profiling.collective``) does the same for the replicas'
gradient all-reduce, timed through the executor's own reducer.

``measure_runtime`` runs a short trial of the pipeline (K=2 local ranks, the distributed
runner, a few steps at a few M) and compares each measured forward and backward action with
its layers' profiled sum: the line through those points is the cost model's ``Runtime``
(``compute_scale`` x profiled + ``action_ms``). Layers profiled one at a time run with hot
caches; inside a pipeline they do not, and each action pays the runtime's dispatch.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from executor.distributed.runner import DistributedRunner
from executor.distributed.spawn import spawn_local
from executor.profiling.collective import (
    DEFAULT_SIZES,
    all_reduce_times,
    fit_all_reduce,
    measure_all_reduce,
    reducer_times,
    relative_line,
)
from executor.runtime.job import load_job
from partitioner.cost.model import CostModel
from partitioner.formats.assumptions import Link, Runtime
from partitioner.formats.plan import Plan, save_plan
from partitioner.formats.profile import Profile
from partitioner.schedule.recompute import Recompute
from partitioner.simulator.durations import stage_durations, stage_of_ranges
from partitioner.simulator.engine import ranges_from_boundaries, simulate
from partitioner.solve.planner import make_plan

__all__ = ["DEFAULT_SIZES", "Trial", "all_reduce_times", "calibrate_world", "check_job",
           "fit_all_reduce", "fit_link", "fit_runtime", "fit_trials", "measure_all_reduce",
           "measure_link", "measure_runtime", "ping_pong", "reducer_times", "run_trials",
           "trial_plans"]

def ping_pong(sizes_bytes: Sequence[int], repeats: int, device: str = "cpu") -> list[float]:
    """On every rank of the process group: ranks 0 and 1 bounce a buffer of each size on
    ``device`` (the others wait); the median one-way time (ms) of each size."""
    rank, dev = dist.get_rank(), torch.device(device)
    out = []
    for n_bytes in sizes_bytes:
        buf = torch.zeros(max(1, n_bytes // 4), dtype=torch.float32, device=dev)
        times = []
        for r in range(repeats + 2):  # two warm-up rounds
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif rank == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if r >= 2:
                times.append((time.perf_counter() - start) * 1e3 / 2)
        out.append(statistics.median(times))
    return out


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
    slope, intercept = relative_line(sizes_bytes, times_ms)
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
    per_rank = spawn_local(ping_pong, 2, args=(list(sizes_bytes), repeats), threads=threads,
                           timeout_s=timeout_s, deadline_s=timeout_s * 2)
    return fit_link(list(sizes_bytes), per_rank[0])


def fit_runtime(profiled_ms: Sequence[float], measured_ms: Sequence[float]) -> Runtime:
    """The line ``measured = compute_scale * profiled + action_ms`` through (profiled,
    measured) action times, fitted on relative errors as ``fit_link`` does; ``action_ms`` is
    kept >= 0 (else the line is refitted through the origin).

        >>> fit_runtime([1.0, 2.0, 4.0], [1.3, 2.5, 4.9])
        Runtime(compute_scale=1.2, action_ms=0.1, message_ms=0.0, device=None)
    """
    if len(profiled_ms) != len(measured_ms) or len(profiled_ms) < 2:
        raise ValueError(f"need at least two (profiled, measured) pairs of equal count, got "
                         f"{len(profiled_ms)} and {len(measured_ms)}")
    if not (min(profiled_ms) > 0 and min(measured_ms) > 0
            and max(profiled_ms) > min(profiled_ms)):
        raise ValueError("profiled and measured times must be > 0, with at least two distinct "
                         "profiled times")
    slope, intercept = relative_line(profiled_ms, measured_ms)
    return Runtime(compute_scale=round(float(slope), 6), action_ms=round(float(intercept), 6))


@dataclass(frozen=True)
class Trial:
    """One plan's trial on one rank: the wall time of each timed step (from a barrier to
    the end of ``train_step``) and, when recorded (rank 0 only; empty elsewhere), the median
    time of each of the stages' F and B actions, keyed (stage, kind, micro-batch), and each
    step's length on the measured timeline (first action's start to last action's end)."""

    step_ms: list[float]
    action_ms: dict[tuple[int, str, int], float]
    timeline_ms: list[float] = field(default_factory=list)
    allreduce_ms: list[float] = field(default_factory=list)  # replicas: each step's gradient sum
    #: per stage of the rank, the most activation bytes it held in a timed step
    activation_peak_bytes: dict[int, int] = field(default_factory=dict)


def run_trials(job_spec: str, plan_paths: Sequence[str], warmup: int, steps: int,
               record: bool = False, device: str = "cpu",
               keep_freed_memory: bool = True) -> list[Trial]:
    """On every rank of the process group: train each plan for ``warmup + steps`` steps of
    ``job_spec`` on ``device`` (gradients cleared, no optimizer step), timing the last
    ``steps``. With ``record`` the runner's timelines are gathered on rank 0 (which costs
    the step a gather). ``keep_freed_memory`` as ``partition-model run`` does by default: the
    trial measures the runs it calibrates for."""
    job = load_job(job_spec)
    out = []
    for j, path in enumerate(plan_paths):
        if j and job.is_graph:  # a traced model's stage is materialised in it: a fresh one
            job = load_job(job_spec)
        runner = DistributedRunner(job.layers, path, num_layers=job.num_layers, device=device,
                                   timeout_s=120.0, keep_freed_memory=keep_freed_memory,
                                   sample=job.sample, weights=job.weights)
        params = runner.parameters()
        walls: list[float] = []
        spans: list[float] = []
        reduced: list[float] = []
        actions: dict[tuple[int, str, int], list[float]] = {}
        peaks: dict[int, int] = {}
        for step in range(warmup + steps):
            inputs, targets = job.batch(step, runner.plan.global_batch)
            for p in params:
                p.grad = None
            dist.barrier()
            start = time.perf_counter()
            result = runner.train_step(inputs, targets, job.loss_fn, timeline=record)
            walls.append((time.perf_counter() - start) * 1e3)
            if runner.reducer is not None and runner.reducer.last_ms is not None:
                reduced.append(runner.reducer.last_ms)
            if step >= warmup:
                for k, peak in result.activation_peak_bytes.items():
                    peaks[k] = max(peaks.get(k, 0), peak)
            if result.timeline is not None and step >= warmup:
                spans.append(result.timeline.step_ms)
                for e in result.timeline.events:
                    if e.action.kind in ("F", "B"):
                        key = (e.action.stage, e.action.kind, e.action.microbatch)
                        actions.setdefault(key, []).append(e.duration_ms)
        out.append(Trial(walls[warmup:], {k: statistics.median(v) for k, v in actions.items()},
                         spans, reduced[warmup:], peaks))
    return out


def trial_plans(profile: Profile, global_batch: int, microbatches: Sequence[int], *,
                stages: int = 2, link: Link | None = None, recompute: Recompute = "never",
                devices: Sequence[str] | None = None) -> list[tuple[CostModel, Plan]]:
    """The calibration trial: the exact plan of each M, with the profile taken as it is."""
    models = [CostModel(profile, global_batch, m, stages=stages, recompute=recompute,
                        link=link or Link(float("inf"), 0.0)) for m in microbatches]
    return [(cm, make_plan(cm, devices=list(devices or ["cpu"] * stages))) for cm in models]


def fit_trials(trials: Sequence[tuple[CostModel, Plan]], measured: Sequence[Trial]) -> Runtime:
    """The runtime of the trial plans as rank 0 measured them: ``compute_scale`` and
    ``action_ms`` through every (stage, F|B, micro-batch) time against its profiled sum at
    that micro-batch's size; then ``message_ms``, the delivery delay that makes the simulated
    steps as long as the measured ones (median timeline step per plan, summed over the plans;
    0 when the actions alone already account for them, or when the link is free)."""
    xs, ys = [], []
    for (cm, plan), trial in zip(trials, measured, strict=True):
        ranges = ranges_from_boundaries(plan.boundaries)
        dur = stage_durations(cm, stage_of_ranges(ranges), list(range(plan.num_stages)))
        for (k, kind, i), ms in sorted(trial.action_ms.items()):
            predicted = (dur.fwd_ms if kind == "F" else dur.bwd_ms)[k][dur.size_index[i]]
            if predicted > 0:
                xs.append(predicted)
                ys.append(ms)
    runtime = fit_runtime(xs, ys)
    spans = [(cm, plan, statistics.median(t.timeline_ms))
             for (cm, plan), t in zip(trials, measured, strict=True) if t.timeline_ms]
    if not spans:
        return runtime

    def excess(delay_ms: float) -> float:  # simulated minus measured, over the trial plans
        rt = replace(runtime, message_ms=delay_ms)
        return sum(simulate(replace(cm, runtime=rt), ranges_from_boundaries(plan.boundaries),
                            record=False).step_ms - ms for cm, plan, ms in spans)

    low, high = 0.0, 1.0
    if excess(low) >= 0:
        return runtime
    while excess(high) < 0:
        if high > 100.0:  # messages cannot explain it (a free link has no messages to delay)
            return runtime
        low, high = high, 2 * high
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if excess(mid) < 0 else (low, mid)
    return replace(runtime, message_ms=round(high, 6))


def check_job(job: str, profile: Profile) -> None:
    """ValueError unless the job's model has the profile's layer count."""
    loaded = load_job(job)
    layers = loaded.num_layers
    if not loaded.is_graph and layers != profile.num_layers:  # traced: each rank checks
        raise ValueError(f"job {job!r} has {layers} layers but profile {profile.model!r} has "
                         f"{profile.num_layers}; give the profile of the job's model")


def measure_runtime(job: str, profile: Profile, global_batch: int, *, link: Link | None = None,
                    microbatches: Sequence[int] = (1, 4), recompute: Recompute = "never",
                    steps: int = 8, warmup: int = 2, threads: int = 1,
                    timeout_s: float = 300.0) -> Runtime:
    """Fit the executor's ``Runtime`` from a trial run of ``job`` (a ``module:function``
    spec, see ``executor.runtime.job``; ``profile`` is its model's profile) on two local CPU
    ranks: for each M in ``microbatches``, the exact K=2 plan runs ``warmup + steps`` steps,
    and every stage's median F and B time is paired with its profiled sum (the same
    micro-batch size, before any runtime correction)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    check_job(job, profile)
    trials = trial_plans(profile, global_batch, microbatches, link=link, recompute=recompute)
    with tempfile.TemporaryDirectory(prefix="gpipe-calibrate-") as tmp:
        paths = [str(Path(tmp) / f"trial-{i}.json") for i in range(len(trials))]
        for (_, plan), path in zip(trials, paths, strict=True):
            save_plan(plan, path)
        per_rank = spawn_local(run_trials, 2, (job, paths, warmup, steps, True), threads=threads,
                               timeout_s=timeout_s, deadline_s=timeout_s * 2)
    return fit_trials(trials, per_rank[0])


def calibrate_world(job: str, profile: Profile, global_batch: int, microbatches: Sequence[int],
                    steps: int = 8, timeout_s: float = 300.0) -> tuple[Link, Runtime] | None:
    """Under torchrun, on every rank: initialise the process group (NCCL on CUDA, else gloo),
    measure the link between ranks 0 and 1 and fit the runtime from K = world-size trial plans
    of ``job`` at each M; rank 0 returns (link, runtime), the others None."""
    cuda = torch.cuda.is_available()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=timedelta(seconds=timeout_s))
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        if world < 2:
            raise ValueError("calibrate needs at least two ranks (torchrun --nproc-per-node 2 "
                             "or more); a single rank has no link to measure")
        times = ping_pong(DEFAULT_SIZES, 10, device)
        box: list[Link | None] = [fit_link(DEFAULT_SIZES, times) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        link = box[0]
        assert link is not None
        devices = [f"cuda:{k}" if cuda else "cpu" for k in range(world)]
        trials = trial_plans(profile, global_batch, microbatches, stages=world, link=link,
                             devices=devices)
        with tempfile.TemporaryDirectory(prefix="gpipe-calibrate-") as tmp:
            paths = [str(Path(tmp) / f"trial-{i}.json") for i in range(len(trials))]
            for (_, plan), path in zip(trials, paths, strict=True):
                save_plan(plan, path)
            measured = run_trials(job, paths, 2, steps, True, device)
        if rank != 0:
            return None
        return link, fit_trials(trials, measured)
    finally:
        dist.destroy_process_group()
