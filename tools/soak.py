"""Soak: a long run on two local ranks, watching each rank's memory and the step time drift.

    PYTHONPATH=. python tools/soak.py --steps 500          # gpt-text, K=2 1F1B, Adam
    PYTHONPATH=. python tools/soak.py --steps 60 --job executor.workloads.jobs:demo

Two local CPU ranks (gloo, one thread each, the allocator keeping freed memory as
``partition-model run`` does) train the job's model under a K=2 plan (the layers halved, 1F1B,
M=4, B=16) with its optimizer, for ``--steps`` steps. After every step each rank reads its
resident memory (``/proc/self/statm``) and its step time. Printed, with the goals: each rank's
resident memory after step 50 (``--settle``) and its largest from there to the end (goal:
within 5%), and the median step time of the last 50 steps against that of steps 50-100 (goal:
within 5%). The last line is ``rss_growth=X step_drift=Y`` (the worst rank's, as fractions).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from executor.distributed.runner import DistributedRunner
from executor.distributed.spawn import spawn_local
from executor.runtime.allocator import keep_freed_memory
from executor.runtime.job import load_job
from executor.runtime.pipeline import manual_plan

GOAL = 0.05


def resident_bytes() -> int:
    """This process's resident memory, from /proc (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak_rank(job_spec: str, steps: int) -> dict[str, list[float]]:
    """On each rank: train ``steps`` steps; each step's time (ms) and resident bytes after it."""
    keep_freed_memory()
    job = load_job(job_spec)
    assert job.num_layers is not None, "the soak runs chain jobs"
    half = job.num_layers // 2
    plan = manual_plan([0, half, job.num_layers], 4, 16, "1f1b", "never")
    runner = DistributedRunner(job.layers, plan, num_layers=job.num_layers, timeout_s=120)
    optimizer = runner.make_optimizer(job.optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.01)))
    out: dict[str, list[float]] = {"step_ms": [], "rss": []}
    for step in range(steps):
        inputs, targets = job.batch(step, plan.global_batch)
        start = time.perf_counter()
        if optimizer is not None:
            optimizer.zero_grad()
        runner.train_step(inputs, targets, job.loss_fn)
        if optimizer is not None:
            optimizer.step()
        out["step_ms"].append((time.perf_counter() - start) * 1e3)
        out["rss"].append(float(resident_bytes()))
    return out


def figures(per_rank: list[dict[str, list[float]]], settle: int) -> list[dict[str, Any]]:
    """Per rank: resident memory after step ``settle`` and its peak after, step time medians of
    steps settle..2*settle and of the last ``settle`` steps, and the two ratios."""
    rows = []
    for rank, got in enumerate(per_rank):
        rss, ms = got["rss"], got["step_ms"]
        base, peak = rss[settle - 1], max(rss[settle - 1:])
        early, late = statistics.median(ms[settle:2 * settle]), statistics.median(ms[-settle:])
        rows.append({"rank": rank, "rss_settled_mb": base / 2**20, "rss_peak_mb": peak / 2**20,
                     "rss_growth": peak / base - 1, "early_ms": early, "late_ms": late,
                     "step_drift": late / early - 1})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--settle", type=int, default=50,
                   help="steps before memory is taken as settled (and the drift's window)")
    p.add_argument("--job", default="executor.workloads.jobs:translation")
    args = p.parse_args(argv)
    if args.settle < 1 or args.steps < 3 * args.settle:
        raise SystemExit(f"--steps {args.steps} must be at least 3 x --settle {args.settle}: "
                         f"the settled memory, the early and the late window")
    start = time.perf_counter()
    per_rank = spawn_local(soak_rank, 2, (args.job, args.steps), threads=1,
                           timeout_s=max(300.0, args.steps * 10.0))
    rows = figures(per_rank, args.settle)
    print(f"{args.job}, {args.steps} steps on 2 ranks in {time.perf_counter() - start:.0f} s")
    print(f"{'rank':>4} {'rss@' + str(args.settle) + '_MB':>10} {'rss_peak_MB':>11} "
          f"{'growth':>7} {'early_ms':>9} {'late_ms':>8} {'drift':>7}")
    for r in rows:
        print(f"{r['rank']:>4} {r['rss_settled_mb']:>10.1f} {r['rss_peak_mb']:>11.1f} "
              f"{100 * r['rss_growth']:>6.2f}% {r['early_ms']:>9.2f} {r['late_ms']:>8.2f} "
              f"{100 * r['step_drift']:>+6.2f}%")
    for rank, got in enumerate(per_rank):
        ms = got["step_ms"]
        windows = [statistics.median(ms[i:i + args.settle])
                   for i in range(0, len(ms) - args.settle + 1, args.settle)]
        print(f"rank {rank} median step ms per {args.settle} steps: "
              + " ".join(f"{w:.1f}" for w in windows))
    growth = max(r["rss_growth"] for r in rows)
    drift = max(abs(r["step_drift"]) for r in rows)
    print(f"goals: memory after step {args.settle} within 5% to the end "
          f"({'met' if growth <= GOAL else 'NOT met'}), the last {args.settle} steps' median "
          f"within 5% of steps {args.settle}-{2 * args.settle}'s "
          f"({'met' if drift <= GOAL else 'NOT met'})")
    print(f"rss_growth={growth:.4f} step_drift={drift:.4f}")


if __name__ == "__main__":
    main()
