"""Measure the link between two local ranks, so predictions use this machine's communication.

    >>> link = measure_link(sizes_bytes=(4096, 1 << 20), repeats=5)   # doctest: +SKIP
    >>> link.bandwidth_gbps, link.latency_ms                          # doctest: +SKIP
    (1.9, 0.08)

Two ranks (gloo on 127.0.0.1, as the distributed runner uses) bounce a buffer of each size;
half a round trip is one transfer. A line through (bytes, ms), fitted on relative errors,
gives ``latency_ms`` (intercept) and ``bandwidth_gbps`` (inverse slope): the cost model's
``latency + bytes / bandwidth``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from partitioner.costs import Link

from .spawn import spawn_local

__all__ = ["fit_link", "measure_link"]

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
    x, y = np.asarray(sizes_bytes, dtype=float), np.asarray(times_ms, dtype=float)
    w = 1.0 / np.maximum(y, 1e-9)
    slope, intercept = np.polyfit(x, y, 1, w=w)
    if intercept < 0:  # refit through the origin
        slope, intercept = float(np.dot(w * w * x, y) / np.dot(w * w * x, x)), 0.0
    slope = max(float(slope), 1e-12)
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
