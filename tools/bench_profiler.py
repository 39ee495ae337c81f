"""Benchmark of the profiler's fidelity: the sum of the per-layer forward+backward times against
the whole model's measured forward+backward, per built-in model and micro-batch size.

    python tools/bench_profiler.py                          # small built-ins, sizes 1,2,4,8
    python tools/bench_profiler.py --models gpt-tiny --rounds 5 --threads 2

A ratio of 1.0 means the profile adds up to the model; the target is 0.9..1.1. ``--timing``
picks how the profiler times layers (default: its own default, inside passes of the whole model
where that fits; ``layer``: each alone, as for a model too big for the device). Each round
profiles the model and then measures the whole model, size by size, so both see the same
machine load; the table shows the median ratio over rounds (min..max beside it), with the per-call overhead correction
(``corrected``) and without it (``raw``: the correction added back), and the minor page faults
per timed step of the whole model and of all the layers' timing passes (``faults``).

On the CPU, glibc's malloc by default hands memory back to the OS after the whole model's
backward frees every activation, so the next forward page-faults it in again, while a layer
timed alone reuses its own freed memory. The profiler (and the executor) therefore set malloc
to keep freed memory (``executor.runtime.allocator``), as CUDA's caching allocator does; the
``faults`` column (per timed step, whole/layers, warm-up and memory passes included) shows
what page faults remain.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

from executor.profiling.profiler import TIMINGS, profile_model, time_whole_model
from executor.workloads.models import build_model
from partitioner.report.tables import format_table

DEFAULT_MODELS = "gpt-tiny,resnet-tiny,gpt-small,resnet-small"


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_model(name: str, sizes: list[int], args: argparse.Namespace) -> list[list[object]]:
    work = build_model(name, batch=max(sizes))
    corrected: dict[int, list[float]] = {b: [] for b in sizes}
    raw: dict[int, list[float]] = {b: [] for b in sizes}
    whole_ms: dict[int, list[float]] = {b: [] for b in sizes}
    faults = {b: [0, 0] for b in sizes}  # whole model, all layers; summed over rounds
    opts = {"warmup": args.warmup, "repeat": args.repeat, "threads": args.threads,
            "clock": args.clock,
            "flush_bytes": None if args.flush_mib is None else args.flush_mib << 20,
            "keep_freed_memory": True}  # as the profile command and the runners have it
    start = time.perf_counter()
    for _ in range(args.rounds):
        for b in sizes:  # the layers and the whole model back to back: the same machine load
            layers_start = _minor_faults()
            prof = profile_model(work.model, work.sample, [b], "cpu", name=name,
                                 timing=args.timing, **opts)
            layers_faults = _minor_faults() - layers_start
            harness = prof.extra["harness"]
            # the reference runs as the layers were timed: flushed only if they were
            before = _minor_faults()
            (fwd_ms, bwd_ms), = time_whole_model(
                work.model, work.sample, [b], "cpu",
                **{**opts, "flush_bytes": harness["flush_bytes"]})
            faults[b][0] += _minor_faults() - before
            faults[b][1] += layers_faults
            layers_ms = sum(lay.fwd_ms[0] + lay.bwd_ms[0] for lay in prof.layers)
            calls_ms = sum(harness["overhead_fwd_ms"]
                           + (harness["overhead_bwd_ms"] if lay.bwd_ms[0] > 0 else 0.0)
                           for lay in prof.layers)
            corrected[b].append(layers_ms / (fwd_ms + bwd_ms))
            raw[b].append((layers_ms + calls_ms) / (fwd_ms + bwd_ms))
            whole_ms[b].append(fwd_ms + bwd_ms)
    took = time.perf_counter() - start
    steps = args.rounds * (args.warmup + args.repeat)
    rows: list[list[object]] = []
    for b in sizes:
        ratio = statistics.median(corrected[b])
        rows.append([name, b, len(prof.layers), f"{statistics.median(whole_ms[b]):.3f}",
                     f"{ratio:.3f}", f"{min(corrected[b]):.3f}..{max(corrected[b]):.3f}",
                     f"{statistics.median(raw[b]):.3f}",
                     f"{faults[b][0] // steps}/{faults[b][1] // steps}",
                     "ok" if 0.9 <= ratio <= 1.1 else "OFF"])
    how = ("inside the whole model" if harness["timing"] == "model" else
           f"alone; per-call overhead fwd {harness['overhead_fwd_ms']:.4f} ms, bwd "
           f"{harness['overhead_bwd_ms']:.4f} ms")
    print(f"  {name}: {args.rounds} round(s) in {took:.1f} s; layers timed {how}", flush=True)
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
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--flush-mib", type=int, default=None,
                   help="flush the caches with a buffer of this many MiB before each timed "
                        "region, the whole model's and each layer's (default: the "
                        "profiler's, twice one core's L2 cache; 0: off)")
    p.add_argument("--timing", choices=TIMINGS, default="auto",
                   help="how the profiler times layers (default: auto, its default)")
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
                        "faults", "0.9..1.1"], rows))


if __name__ == "__main__":
    main()
