"""Soak: a long run on two local ranks, watching each rank's memory and the step time drift.

    PYTHONPATH=. python tools/soak.py --steps 500          # gpt-text, K=2 1F1B, Adam
    PYTHONPATH=. python tools/soak.py --steps 60 --job executor.workloads.jobs:demo

Two local CPU ranks (gloo, one thread each, the allocator keeping freed memory as
``partition-model run`` does) train the job's model under a K=2 plan (the layers halved, 1F1B,
M=4, B=16) with its optimizer, for ``--steps`` steps. After every step each rank reads its
resident memory (``/proc/self/statm``) and its step time. Printed, with the goals: each rank's
resident memory after step 50 (``--settle``) and its largest from there to the end (goal:
within 5%), and the median step time of the last 50 steps against that of steps 50-100 (goal:
within 5%). The last line is ``rss_growth=X step_drift=Y ref_drift=Z normalised_drift=W
cpu_drift=C`` (the worst rank's, as fractions).

The host's load moves a 50-step window's median by 10-30% on a shared machine, either way, so
each rank also times a fixed reference kernel (``REFERENCE``: a few float32 matrix products
on its one thread) right after every step: the host's slowdowns show in both, a drift of the
training step alone (growing Python state, denormal numbers, a leak the allocator hides) only
in the step. ``normalised_drift`` is the drift of step / reference, step by step, printed
beside the raw drift (which the goal judges) and the reference's own. Measured here, the
reference follows only part of the host's effect on a pipeline (whose ranks also wait on each
other and on gloo's sockets): it tells a host-wide slowdown, not every one. ``cpu_drift`` is
the drift of the CPU time each rank's process spends per step (every thread, gloo's
included): work the code adds over time shows in it, time lost waiting for a busy host's
cores does not (a slower core still does: caches and clock shared with other tenants).
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


#: The reference kernel: REFERENCE[1] products of two REFERENCE[0]-square float32 matrices
#: (about 3 ms on one thread here).
REFERENCE = (192, 8)


def reference_ms(a: torch.Tensor, b: torch.Tensor, repeat: int) -> float:
    """Milliseconds of ``repeat`` products a @ b."""
    start = time.perf_counter()
    for _ in range(repeat):
        torch.mm(a, b)
    return (time.perf_counter() - start) * 1e3


def soak_rank(job_spec: str, steps: int) -> dict[str, list[float]]:
    """On each rank: train ``steps`` steps; each step's time (ms), the CPU time its process
    spent in it (ms, every thread), resident bytes after it, and the reference kernel's time
    right after it."""
    keep_freed_memory()
    job = load_job(job_spec)
    assert job.num_layers is not None, "the soak runs chain jobs"
    half = job.num_layers // 2
    plan = manual_plan([0, half, job.num_layers], 4, 16, "1f1b", "never")
    runner = DistributedRunner(job.layers, plan, num_layers=job.num_layers, timeout_s=120)
    optimizer = runner.make_optimizer(job.optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.01)))
    out: dict[str, list[float]] = {"step_ms": [], "rss": [], "ref_ms": [], "cpu_ms": []}
    g = torch.Generator().manual_seed(0)
    size, repeat = REFERENCE
    a, b = (torch.randn(size, size, generator=g) for _ in range(2))
    for step in range(steps):
        inputs, targets = job.batch(step, plan.global_batch)
        start, cpu = time.perf_counter(), time.process_time()
        if optimizer is not None:
            optimizer.zero_grad()
        runner.train_step(inputs, targets, job.loss_fn)
        if optimizer is not None:
            optimizer.step()
        out["step_ms"].append((time.perf_counter() - start) * 1e3)
        out["cpu_ms"].append((time.process_time() - cpu) * 1e3)
        out["rss"].append(float(resident_bytes()))
        out["ref_ms"].append(reference_ms(a, b, repeat))
    return out


def figures(per_rank: list[dict[str, list[float]]], settle: int) -> list[dict[str, Any]]:
    """Per rank: resident memory after step ``settle`` and its peak after, step time medians of
    steps settle..2*settle and of the last ``settle`` steps, and the ratios: of the steps, of
    the reference kernel's times, and of step / reference."""
    rows = []

    def drift(xs: list[float]) -> float:
        return statistics.median(xs[-settle:]) / statistics.median(xs[settle:2 * settle]) - 1

    for rank, got in enumerate(per_rank):
        rss, ms, ref, cpu = got["rss"], got["step_ms"], got["ref_ms"], got["cpu_ms"]
        base, peak = rss[settle - 1], max(rss[settle - 1:])
        early, late = statistics.median(ms[settle:2 * settle]), statistics.median(ms[-settle:])
        rows.append({"rank": rank, "rss_settled_mb": base / 2**20, "rss_peak_mb": peak / 2**20,
                     "rss_growth": peak / base - 1, "early_ms": early, "late_ms": late,
                     "step_drift": late / early - 1, "ref_drift": drift(ref),
                     "cpu_drift": drift(cpu),
                     "normalised_drift": drift([m / r for m, r in zip(ms, ref, strict=True)])})
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
          f"{'growth':>7} {'early_ms':>9} {'late_ms':>8} {'drift':>7} {'ref_drift':>9} "
          f"{'normalised':>10} {'cpu_drift':>9}")
    for r in rows:
        print(f"{r['rank']:>4} {r['rss_settled_mb']:>10.1f} {r['rss_peak_mb']:>11.1f} "
              f"{100 * r['rss_growth']:>6.2f}% {r['early_ms']:>9.2f} {r['late_ms']:>8.2f} "
              f"{100 * r['step_drift']:>+6.2f}% {100 * r['ref_drift']:>+8.2f}% "
              f"{100 * r['normalised_drift']:>+9.2f}% {100 * r['cpu_drift']:>+8.2f}%")
    for rank, got in enumerate(per_rank):
        ms = got["step_ms"]
        windows = [statistics.median(ms[i:i + args.settle])
                   for i in range(0, len(ms) - args.settle + 1, args.settle)]
        print(f"rank {rank} median step ms per {args.settle} steps: "
              + " ".join(f"{w:.1f}" for w in windows))
    growth = max(r["rss_growth"] for r in rows)
    drift, ref, norm, cpu = (max(abs(r[key]) for r in rows)
                             for key in ("step_drift", "ref_drift", "normalised_drift",
                                         "cpu_drift"))
    print(f"goals: memory after step {args.settle} within 5% to the end "
          f"({'met' if growth <= GOAL else 'NOT met'}), the last {args.settle} steps' median "
          f"within 5% of steps {args.settle}-{2 * args.settle}'s "
          f"({'met' if drift <= GOAL else 'NOT met'}: {100 * drift:.1f}%; the reference "
          f"kernel's own {100 * ref:.1f}%, step / reference {100 * norm:.1f}%, the step's "
          f"CPU time {100 * cpu:.1f}%)")
    print(f"rss_growth={growth:.4f} step_drift={drift:.4f} ref_drift={ref:.4f} "
          f"normalised_drift={norm:.4f} cpu_drift={cpu:.4f}")


if __name__ == "__main__":
    main()
