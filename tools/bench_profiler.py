"""Benchmark of the profiler's fidelity: the sum of the per-layer forward+backward times against
the whole model's measured forward+backward, per built-in model and micro-batch size.

    python tools/bench_profiler.py                          # small built-ins, sizes 1,2,4,8
    python tools/bench_profiler.py --models gpt-tiny --rounds 5 --threads 2

A ratio of 1.0 means the profile adds up to the model; the target is 0.9..1.1. Each round
measures the whole model and then profiles it, so both see the same machine load; the table
shows the median ratio over rounds (min..max beside it), with the per-call overhead correction
(``corrected``) and without it (``raw``: the correction added back).
"""

from __future__ import annotations

import argparse
import statistics
import time

from executor.models import build_model
from executor.profiler import profile_model, time_whole_model
from partitioner.report import format_table

DEFAULT_MODELS = "gpt-tiny,resnet-tiny,gpt-small,resnet-small"


def bench_model(name: str, sizes: list[int], args: argparse.Namespace) -> list[list[object]]:
    work = build_model(name, batch=max(sizes))
    corrected: dict[int, list[float]] = {b: [] for b in sizes}
    raw: dict[int, list[float]] = {b: [] for b in sizes}
    whole_ms: dict[int, list[float]] = {b: [] for b in sizes}
    start = time.perf_counter()
    for _ in range(args.rounds):
        opts = {"warmup": args.warmup, "repeat": args.repeat, "threads": args.threads,
                "clock": args.clock}
        whole = time_whole_model(work.model, work.sample, sizes, "cpu", **opts)
        prof = profile_model(work.model, work.sample, sizes, "cpu", name=name, **opts)
        harness = prof.extra["harness"]
        for j, b in enumerate(sizes):
            layers_ms = sum(lay.fwd_ms[j] + lay.bwd_ms[j] for lay in prof.layers)
            calls_ms = sum(harness["overhead_fwd_ms"]
                           + (harness["overhead_bwd_ms"] if lay.bwd_ms[j] > 0 else 0.0)
                           for lay in prof.layers)
            total_ms = whole[j][0] + whole[j][1]
            corrected[b].append(layers_ms / total_ms)
            raw[b].append((layers_ms + calls_ms) / total_ms)
            whole_ms[b].append(total_ms)
    took = time.perf_counter() - start
    rows: list[list[object]] = []
    for b in sizes:
        rows.append([name, b, len(prof.layers), f"{statistics.median(whole_ms[b]):.3f}",
                     f"{statistics.median(corrected[b]):.3f}",
                     f"{min(corrected[b]):.3f}..{max(corrected[b]):.3f}",
                     f"{statistics.median(raw[b]):.3f}",
                     "ok" if 0.9 <= statistics.median(corrected[b]) <= 1.1 else "OFF"])
    print(f"  {name}: {args.rounds} round(s) in {took:.1f} s; per-call overhead fwd "
          f"{harness['overhead_fwd_ms']:.4f} ms, bwd {harness['overhead_bwd_ms']:.4f} ms",
          flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"default: {DEFAULT_MODELS}")
    p.add_argument("--sizes", default="1,2,4,8", help="micro-batch sizes (default: 1,2,4,8)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads, as one pipeline rank per core runs (default: 1)")
    p.add_argument("--clock", choices=("wall", "thread"), default="thread",
                   help="CPU clock: thread CPU time (default; ignores other processes on a "
                        "shared machine, needs --threads 1) or wall time")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=9)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"== sum of per-layer fwd+bwd / whole-model fwd+bwd (CPU, {args.threads} thread(s), "
          f"{args.clock} clock) ==")
    rows: list[list[object]] = []
    for name in args.models.split(","):
        rows += bench_model(name, sizes, args)
    print(format_table(["model", "b", "layers", "whole_ms", "corrected", "range", "raw",
                        "0.9..1.1"], rows))


if __name__ == "__main__":
    main()
