"""Synthetic profiles with known costs, for tests: every figure given, nothing measured."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from partitioner.formats.profile import DeviceInfo, LayerProfile, Profile
from partitioner.schedule.ir import Schedule


def make_profile(
    fwd_ms: Sequence[float],
    bwd_ms: Sequence[float] | None = None,
    *,
    param_bytes: Sequence[int] | None = None,
    out_bytes: Sequence[float] | None = None,
    saved_bytes: Sequence[float] | None = None,
    in_bytes: Sequence[float] | None = None,
    sizes: Sequence[int] = (1,),
    dtype: str = "float32",
    memory_bytes: int = 2**40,
) -> Profile:
    """A profile whose every figure is given (per layer, at micro-batch size sizes[0]; other
    sizes scale in proportion)."""
    n = len(fwd_ms)
    bwd_ms = bwd_ms if bwd_ms is not None else [2 * f for f in fwd_ms]
    param_bytes = param_bytes if param_bytes is not None else [0] * n
    out_bytes = out_bytes if out_bytes is not None else [0.0] * n
    saved_bytes = saved_bytes if saved_bytes is not None else [0.0] * n
    in_bytes = in_bytes if in_bytes is not None else [0.0, *out_bytes[:-1]]
    scale = [s / sizes[0] for s in sizes]

    def per(x: float) -> tuple[float, ...]:
        return tuple(x * f for f in scale)

    layers = tuple(
        LayerProfile(str(i), "Synthetic", int(param_bytes[i]), per(fwd_ms[i]), per(bwd_ms[i]),
                     per(in_bytes[i]), per(out_bytes[i]), per(saved_bytes[i]))
        for i in range(n))
    return Profile("synthetic", DeviceInfo("test device", "cpu", memory_bytes), dtype,
                   tuple(sizes), layers, torch="none", created="2026-11-28T00:00:00Z")


def random_dag(rng: random.Random, n: int) -> Profile:
    """A layer DAG of n layers with random costs: each layer but the first feeds, with
    probability 0.85, from 1-3 earlier ones (skips of any length); the others are inputs."""
    out = [float(rng.randint(1, 1000)) for _ in range(n)]
    prof = make_profile([rng.uniform(0.1, 3.0) for _ in range(n)],
                        [rng.uniform(0.1, 6.0) for _ in range(n)],
                        param_bytes=[4 * rng.randint(0, 500) for _ in range(n)],
                        out_bytes=out,
                        saved_bytes=[float(rng.randint(0, 1000)) for _ in range(n)],
                        in_bytes=[float(rng.randint(1, 1000)) for _ in range(n)], sizes=(1, 2))
    edges = set()
    for v in range(1, n):
        if rng.random() < 0.85:
            for u in rng.sample(range(v), min(v, rng.randint(1, 3))):
                edges.add((u, v))
    return dataclasses.replace(prof, edges=tuple(sorted(edges)))


def schedule_from_rows(name: str, rows: Sequence[Sequence[str]]) -> Schedule:
    """A schedule from per-stage lists of action texts, e.g. ``[["0F0", "0B0"]]``."""
    return Schedule.parse("\n".join(f"{k}: {' '.join(row)}" for k, row in enumerate(rows)), name)
