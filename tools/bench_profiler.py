"""Benchmark of the profiler's fidelity: the sum of the per-layer forward+backward times against
the whole model's measured forward+backward, per built-in model and micro-batch size.

    python tools/bench_profiler.py                          # small built-ins, sizes 1,2,4,8
    python tools/bench_profiler.py --models gpt-tiny --rounds 5 --threads 2
    python tools/bench_profiler.py --models tiny-unet,tiny-gpt2 --rounds 3   # traced graphs

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

The example graph models (``executor.workloads.graphmodels``, e.g. ``tiny-llama``, ``tiny-unet``)
are traced and timed by the graph profiler; their reference is the model's own (eager)
forward+backward, from ones at its output tensors, timed in the same process right after the
profile at each size. Their ``raw`` column is the profile's whole passes (the layers run in
order, the boundary nodes included) over the same reference, and ``faults`` is not measured;
``layered`` is the traced layers' own forward+backward, run one after the other with nothing
timed inside (what a one-stage pipeline runs: ``LayerGraph.run_layers``), over the same
reference, timed right after it: where it is below 1, the pipeline runs the model faster than
the model runs itself (the graph skips the Python of the modules' calls). ``--paired N``
measures the graph models pass by pass instead: N rounds of an eager pass, a layered pass and
one timed pass of the graph profiler back to back, medians of each (ratios that see the same
moments of a shared machine, whose load swings whole profiles by +-50%).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from executor.graphs.layers import LayerGraph, as_call, trace_model
from executor.profiling.graph import profile_graph
from executor.profiling.graphtime import time_graph_layers
from executor.profiling.measure import Clock, quiet_gc
from executor.profiling.profiler import TIMINGS, profile_model, time_whole_model
from executor.profiling.samples import resize_sample
from executor.workloads.graphmodels import GRAPH_MODELS, build_graph_model
from executor.workloads.models import build_model
from partitioner.report.tables import format_table

DEFAULT_MODELS = ("gpt-tiny,resnet-tiny,gpt-small,resnet-small,tiny-gpt2,tiny-llama,tiny-bert,"
                  "tiny-resnet,tiny-unet")


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
                     f"{faults[b][0] // steps}/{faults[b][1] // steps}", "-",
                     "ok" if 0.9 <= ratio <= 1.1 else "OFF"])
    how = ("inside the whole model" if harness["timing"] == "model" else
           f"alone; per-call overhead fwd {harness['overhead_fwd_ms']:.4f} ms, bwd "
           f"{harness['overhead_bwd_ms']:.4f} ms")
    print(f"  {name}: {args.rounds} round(s) in {took:.1f} s; layers timed {how}", flush=True)
    return rows


def eager_ms(model: torch.nn.Module, sample: object, clock: Clock, warmup: int,
             repeat: int) -> float:
    """Median forward+backward ms of the model itself (from ones at its output tensors), its
    parameters' gradients accumulating as in the profile; the model's .grad are put back."""
    args, kwargs = as_call(sample)
    return _fwd_bwd_ms(lambda: model(*args, **kwargs), model, clock, warmup, repeat)


def layered_ms(graph: LayerGraph, sample: object, clock: Clock, warmup: int,
               repeat: int) -> float:
    """The same for the traced layers run one after the other, as a one-stage pipeline runs
    them (no clock marks, no boundary nodes)."""
    env = graph.inputs_of(*as_call(sample))
    return _fwd_bwd_ms(lambda: graph.run_layers(dict(env), range(graph.num_layers)),
                       graph.model, clock, warmup, repeat)


def _fwd_bwd_ms(forward: Callable[[], Any], model: torch.nn.Module, clock: Clock, warmup: int,
                repeat: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    own = [p.grad for p in params]
    times = []
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        with torch.enable_grad(), quiet_gc(), torch.random.fork_rng(devices=[]):
            for r in range(warmup + repeat):
                start = clock.mark()
                out = forward()
                roots = [t for t in pytree.tree_leaves(dict(out) if hasattr(out, "keys") else out)
                         if isinstance(t, torch.Tensor) and t.requires_grad]
                torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])
                end = clock.mark()
                if r >= warmup:
                    times.append(clock.elapsed_ms([start, end])[0])
    finally:
        for p, g in zip(params, own, strict=True):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return statistics.median(times)


def bench_graph(name: str, sizes: list[int], args: argparse.Namespace) -> list[list[object]]:
    """The graph profiler's layers against the model's own passes, per size."""
    work = build_graph_model(name, batch=max(sizes))
    work.model.train()
    clock = Clock(torch.device("cpu"), args.clock)
    ratios: dict[int, list[float]] = {b: [] for b in sizes}
    passes: dict[int, list[float]] = {b: [] for b in sizes}
    runs: dict[int, list[float]] = {b: [] for b in sizes}
    whole_ms: dict[int, list[float]] = {b: [] for b in sizes}
    start = time.perf_counter()
    graph = trace_model(work.model, work.sample)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for _ in range(args.rounds):
            for b in sizes:
                prof = profile_graph(work.model, work.sample, [b], warmup=args.warmup,
                                     repeats=args.repeat, threads=args.threads,
                                     clock=args.clock, name=name)
                whole = eager_ms(work.model, resize_sample(work.sample, b), clock,
                                 args.warmup, args.repeat)
                runs[b].append(layered_ms(graph, resize_sample(work.sample, b), clock,
                                          args.warmup, args.repeat) / whole)
                harness = prof.extra["harness"]
                layers_ms = sum(lay.fwd_ms[0] + lay.bwd_ms[0] for lay in prof.layers)
                ratios[b].append(layers_ms / whole)
                passes[b].append((harness["pass_fwd_ms"][0] + harness["pass_bwd_ms"][0]) / whole)
                whole_ms[b].append(whole)
    finally:
        torch.set_num_threads(threads)
    print(f"  {name}: {args.rounds} round(s) in {time.perf_counter() - start:.1f} s; traced "
          f"with {prof.extra['trace']['tracer']}, layers timed inside the whole model",
          flush=True)
    rows: list[list[object]] = []
    for b in sizes:
        ratio = statistics.median(ratios[b])
        rows.append([name, b, prof.num_layers, f"{statistics.median(whole_ms[b]):.3f}",
                     f"{ratio:.3f}", f"{min(ratios[b]):.3f}..{max(ratios[b]):.3f}",
                     f"{statistics.median(passes[b]):.3f}", "-",
                     f"{statistics.median(runs[b]):.3f}", "ok" if 0.9 <= ratio <= 1.1 else "OFF"])
    return rows


def bench_graph_paired(name: str, sizes: list[int], args: argparse.Namespace
                       ) -> list[list[object]]:
    """Per size, ``args.paired`` rounds of three passes back to back: the eager model, the
    traced layers run one after the other (``layered``), and one of the graph profiler's
    timed passes (``time_graph_layers``, one pass: its layers' times summed); medians of each,
    so that the ratios see the same moments of a noisy machine."""
    work = build_graph_model(name, batch=max(sizes))
    work.model.train()
    clock = Clock(torch.device("cpu"), args.clock)
    graph = trace_model(work.model, work.sample)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rows: list[list[object]] = []
    start = time.perf_counter()
    try:
        for b in sizes:
            sample = resize_sample(work.sample, b)
            env = graph.inputs_of(*as_call(sample))
            got: dict[str, list[float]] = {"eager": [], "layered": [], "sum": []}
            for r in range(args.warmup + args.paired):
                eager = eager_ms(work.model, sample, clock, 0, 1)
                layered = layered_ms(graph, sample, clock, 0, 1)
                t = time_graph_layers(graph, env, clock, warmup=0, repeat=1)
                if r >= args.warmup:
                    got["eager"].append(eager)
                    got["layered"].append(layered)
                    got["sum"].append(sum(t.fwd_ms) + sum(t.bwd_ms))
            med = {k: statistics.median(v) for k, v in got.items()}
            ratio = med["sum"] / med["eager"]
            rows.append([name, b, graph.num_layers, f"{med['eager']:.3f}", f"{ratio:.3f}",
                         f"{med['layered'] / med['eager']:.3f}",
                         f"{med['sum'] / med['layered']:.3f}",
                         "ok" if 0.9 <= ratio <= 1.1 else "OFF"])
    finally:
        torch.set_num_threads(threads)
    print(f"  {name}: {args.paired} paired rounds per size in "
          f"{time.perf_counter() - start:.1f} s; traced with {graph.capture.tracer}", flush=True)
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
    p.add_argument("--paired", type=int, default=0,
                   help="for the graph models: this many rounds of eager, layered and profiled "
                        "passes back to back instead of whole profiles (default: 0, off)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"== sum of per-layer fwd+bwd / whole-model fwd+bwd (CPU, {args.threads} thread(s), "
          f"{args.clock} clock) ==")
    rows: list[list[object]] = []
    paired: list[list[object]] = []
    for name in args.models.split(","):
        if args.paired and name in GRAPH_MODELS:
            paired += bench_graph_paired(name, sizes, args)
            continue
        bench = bench_graph if name in GRAPH_MODELS else bench_model
        rows += bench(name, sizes, args)
    if paired:
        print(format_table(["model", "b", "layers", "eager_ms", "sum/eager", "layered/eager",
                            "sum/layered", "0.9..1.1"], paired))
    if not rows:
        return
    print(format_table(["model", "b", "layers", "whole_ms", "corrected", "range", "raw",
                        "faults", "layered", "0.9..1.1"], rows))


if __name__ == "__main__":
    main()
