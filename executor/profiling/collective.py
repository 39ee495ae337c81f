"""Calibrate the replicas' gradient all-reduce: time it on local ranks, fit the ring model.

    >>> link = measure_all_reduce(ranks=2)          # doctest: +SKIP
    >>> link.bandwidth_gbps, link.latency_ms        # doctest: +SKIP
    (0.62, 0.09)

n local ranks (gloo on 127.0.0.1) sum gradients of each size, and the ring model
``2 (n-1)/n x bytes / bandwidth + 2 (n-1) x latency`` (each of the 2 (n-1) steps of a
reduce-scatter then an all-gather moves 1/n of the buffer) fitted to those times gives the Link
the cost model prices the all-reduce with. By default the sum is timed as the executor does it
(``through="reducer"``): ``GradReducer`` all-reduces each bucket of gradients asynchronously
(the gradients are views into the buckets, as a step's ``attach`` makes them), starting, as in a
training step, from gradients out of the caches (a backward wrote other memory since), under
the allocator the run uses. Measured, before the gradients became bucket views (when the
reducer packed them and copied the sums back),
here on gpt-text's 5 MB of gradients: a plain all-reduce of one flat buffer took 6.5 ms, the
reducer 7.7 ms, 8.8 ms after a cache flush, and about 2 ms more in a run whose allocator keeps
freed memory (``partition-model run``'s default), so pricing the bare collective
(``through="collective"``) predicts the executor's sum short by a third or more.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from executor.distributed.replicas import GradReducer
from executor.distributed.spawn import spawn_local
from executor.runtime.allocator import keep_freed_memory as keep_memory
from partitioner.formats.assumptions import Link

__all__ = ["ALL_REDUCE_SIZES", "DEFAULT_SIZES", "all_reduce_times", "fit_all_reduce",
           "measure_all_reduce", "reducer_times", "relative_line"]

DEFAULT_SIZES = (4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20)

#: The all-reduce's sizes: denser from 1 to 16 MB, where the reducer's buckets (4 MB) start to
#: split a stage's gradients, and where the CPU models' stages lie (gpt-text: 5 MB in all).
ALL_REDUCE_SIZES = (4 << 10, 64 << 10, 1 << 20, 2 << 20, 4 << 20, 6 << 20, 8 << 20, 16 << 20)

#: The gradients' tensor size in ``reducer_times``: about the mean of the CPU models' (gpt-text:
#: 77 tensors, 5 MB), so that each bucket is packed and copied back as theirs are.
GRAD_TENSOR_BYTES = 64 << 10

#: Bytes written between two timed rounds: more than the core's L2 (4 MiB here), as a backward
#: moves between the last gradient's write and the all-reduce's start.
FLUSH_BYTES = 64 << 20

Through = Literal["reducer", "collective"]


def relative_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Slope and intercept of the line through (x, y), each point weighing 1 / y (relative
    errors); refitted through the origin when the intercept or the slope comes out negative.

        >>> [round(v, 6) for v in relative_line([1.0, 2.0, 3.0], [3.0, 5.0, 7.0])]
        [2.0, 1.0]
    """
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    w = 1.0 / np.maximum(y, 1e-9)
    slope, intercept = np.polyfit(x, y, 1, w=w)
    if intercept < 0 or slope <= 0:
        slope, intercept = float(np.dot(w * w * x, y) / np.dot(w * w * x, x)), 0.0
    return float(slope), float(intercept)


def all_reduce_times(sizes_bytes: Sequence[int], repeats: int, device: str = "cpu") -> list[float]:
    """On every rank of the process group: all-reduce (SUM) a buffer of each size on
    ``device`` over every rank, ``repeats`` rounds over all the sizes in turn (so a burst of
    load elsewhere falls on every size alike); per size, the lower quartile over the rounds of
    the fastest rank's time (ms). Both choices resist a shared machine, whose noise only ever
    adds time: the rank that arrives last waits for no one (the others' times include the skew
    of leaving the barrier, no part of the sum)."""
    dev = torch.device(device)
    bufs = [torch.zeros(max(1, n // 4), dtype=torch.float32, device=dev) for n in sizes_bytes]
    times = _fastest_rank_ms([partial(dist.all_reduce, buf) for buf in bufs], repeats, dev)
    return [float(row.quantile(0.25)) for row in times]


def _fastest_rank_ms(calls: Sequence[Callable[[], object]], repeats: int,
                     dev: torch.device, before: Callable[[int], object] | None = None
                     ) -> torch.Tensor:
    """[call, round]: each call timed from a barrier ``repeats`` rounds over all the calls in
    turn (after two warm-up rounds: connections, allocator), ``before(j)`` run untimed ahead
    of call j; per entry, the fastest rank's time (ms)."""
    times = torch.zeros(len(calls), repeats, dtype=torch.float64)
    for r in range(repeats + 2):
        for j, call in enumerate(calls):
            if before is not None:
                before(j)
            dist.barrier()
            start = time.perf_counter()
            call()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if r >= 2:
                times[j, r - 2] = (time.perf_counter() - start) * 1e3
    dist.all_reduce(times, op=dist.ReduceOp.MIN)
    return times


def reducer_times(sizes_bytes: Sequence[int], repeats: int, device: str = "cpu",
                  keep_freed_memory: bool = True) -> list[float]:
    """On every rank of the process group: ``GradReducer``'s sum of float32 gradients of
    about each size (tensors of ``GRAD_TENSOR_BYTES``), from ``start`` to ``finish``'s end, as
    the runner times it, after ``FLUSH_BYTES`` written, under the allocator the run uses
    (``keep_freed_memory``, on by default as in ``partition-model run``: it makes the sum
    about 2 ms slower on gpt-text's 5 MB here); per size, the median over the rounds of the
    fastest rank's time (ms), the statistic a run's all-reduce is judged by."""
    if keep_freed_memory:
        keep_memory()
    dev = torch.device(device)
    ranks = list(range(dist.get_world_size()))
    reducers: list[GradReducer] = []
    grads: list[list[torch.Tensor]] = []
    for n in sizes_bytes:
        elems = max(1, n // 4)
        chunk = max(1, GRAD_TENSOR_BYTES // 4)
        params = [torch.nn.Parameter(torch.zeros(min(chunk, elems - at), device=dev))
                  for at in range(0, elems, chunk)]
        grads.append([torch.ones_like(p) for p in params])
        for p, g in zip(params, grads[-1], strict=True):
            p.grad = g
        reducers.append(GradReducer(params, dist.group.WORLD, ranks))
        reducers[-1].attach()  # as a step's start does: the gradients become bucket views
        grads[-1] = [p.grad for p in params if p.grad is not None]
    junk = torch.ones(FLUSH_BYTES // 4, device=dev)

    def fresh(j: int) -> None:
        for g in grads[j]:
            g.fill_(1.0)  # sums of ones stay small
        junk.add_(1.0)  # the gradients leave the cache

    times = _fastest_rank_ms([partial(_reduce, red) for red in reducers], repeats, dev, fresh)
    return [statistics.median(row.tolist()) for row in times]


def _reduce(reducer: GradReducer) -> None:
    reducer.start()
    reducer.finish()


def fit_all_reduce(ranks: int, sizes_bytes: Sequence[float], times_ms: Sequence[float]) -> Link:
    """The Link whose ring model (``partitioner.cost.allreduce.ring_allreduce_ms``, the one the
    planner prices replicas with) best fits all-reduces of ``sizes_bytes`` over ``ranks`` that
    took ``times_ms``, on relative errors as ``calibrate.fit_link``.

        >>> fit_all_reduce(2, [1e6, 2e6, 3e6], [2.0, 3.0, 4.0])
        Link(bandwidth_gbps=1.0, latency_ms=0.5)
    """
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 2:
        raise ValueError(f"ranks={ranks!r}: an all-reduce needs at least 2 ranks")
    if len(sizes_bytes) != len(times_ms) or len(sizes_bytes) < 2:
        raise ValueError(f"need at least two (size, time) points of equal count, got "
                         f"{len(sizes_bytes)} sizes and {len(times_ms)} times")
    steps = 2 * (ranks - 1)
    slope, intercept = relative_line(sizes_bytes, times_ms)
    slope = max(slope, 1e-12)
    return Link(bandwidth_gbps=round(steps / ranks / (slope * 1e6), 6),
                latency_ms=round(float(intercept) / steps, 6))


def measure_all_reduce(ranks: int = 2, sizes_bytes: Sequence[int] = ALL_REDUCE_SIZES,
                       repeats: int = 10, threads: int = 1, timeout_s: float = 60.0,
                       through: Through = "reducer", keep_freed_memory: bool = True) -> Link:
    """Spawn ``ranks`` local CPU ranks, time the all-reduce of each size over them (through
    the executor's ``reducer`` under the run's allocator, ``keep_freed_memory``; or the bare
    ``collective``), and fit the ring model's Link (``fit_all_reduce``)."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 2:
        raise ValueError(f"ranks={ranks!r}: an all-reduce needs at least 2 ranks")
    if any(n <= 0 for n in sizes_bytes) or len(set(sizes_bytes)) < 2:
        raise ValueError(f"sizes_bytes={list(sizes_bytes)}: give at least two distinct positive "
                         f"sizes")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    if through not in ("reducer", "collective"):
        raise ValueError(f"through={through!r} is not 'reducer' (the executor's bucketed sum) "
                         f"or 'collective' (a bare all-reduce of one buffer)")
    args = (list(sizes_bytes), repeats, "cpu") + ((keep_freed_memory,) if through == "reducer"
                                                   else ())
    per_rank = spawn_local(reducer_times if through == "reducer" else all_reduce_times, ranks,
                           args=args, threads=threads, timeout_s=timeout_s,
                           deadline_s=timeout_s * 2)
    return fit_all_reduce(ranks, list(sizes_bytes), per_rank[0])
