"""Synthetic profiles with known costs, for tests: every figure given, nothing measured."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

from partitioner.formats.profile import (
    DeviceInfo,
    LayerProfile,
    OutputValue,
    Profile,
    TiedParam,
    profile_from_dict,
)
from partitioner.formats.profile_loss import LossProfile
from partitioner.schedule.generators import v_placement
from partitioner.schedule.ir import Schedule
from partitioner.schedule.listsched import Costs, list_schedule


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


def with_saved_parts(prof: Profile, rng: random.Random) -> Profile:
    """``prof`` with random ``saved_input_bytes`` and ``saved_output_bytes`` (each a share of
    the layer's ``saved_bytes`` at every size, at most its input's or output's bytes), so the
    cost model takes its exact activation terms (``cost.activations``), and, half the time, a
    loss that keeps some bytes and targets on the last stage, and (independently) what each
    layer keeps from I until W (``held_for_w_bytes``: some of its input, some more)."""
    def part(lay: LayerProfile, whole: tuple[float, ...]) -> tuple[float, ...]:
        share = rng.choice([0.0, 0.5, 1.0])
        return tuple(min(share * w, s) for w, s in zip(whole, lay.saved_bytes, strict=True))
    scale = [b / prof.microbatch_sizes[0] for b in prof.microbatch_sizes]
    saved, target = rng.randint(0, 1000), rng.randint(0, 100)
    loss = LossProfile(tuple(saved * f for f in scale), tuple(saved * f / 2 for f in scale),
                       tuple(target * f for f in scale)) if rng.random() < 0.5 else None
    keeps_w = rng.random() < 0.5

    def held_w(lay: LayerProfile) -> dict[str, tuple[float, ...] | None]:
        if not keeps_w:
            return {}
        share, own = rng.choice([0.0, 0.5, 1.0]), rng.choice([0.0, 0.5, 2.0])
        ins = tuple(share * x for x in lay.in_bytes)
        return {"held_for_w_input_bytes": ins, "held_for_w_bytes": tuple(
            i + own * (o + s) for i, o, s in zip(ins, lay.out_bytes, lay.saved_bytes,
                                                  strict=True))}
    return dataclasses.replace(prof, loss=loss, layers=tuple(
        dataclasses.replace(lay, saved_input_bytes=part(lay, lay.in_bytes),
                            saved_output_bytes=part(lay, lay.out_bytes), **held_w(lay))
        for lay in prof.layers))


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


def llama_like_dict() -> dict[str, Any]:
    """An embedding that outputs hidden states, a mask and rotary cos/sin (the last three
    without gradient); block 0 reads all four, block 1 block 0's output and mask, cos and sin
    of the embedding; the head shares the embedding's weight; an ordering-only edge 0 -> 3.
    Every layer: 400 parameter bytes, fwd 1/2 ms, output 100/200 bytes at b = 1/2."""
    def layer(name: str, **more: Any) -> dict[str, Any]:
        return {"name": name, "param_bytes": 400, "fwd_ms": [1.0, 2.0], "bwd_ms": [2.0, 4.0],
                "in_bytes": [4, 8], "out_bytes": [100, 200], "saved_bytes": [4, 8], **more}
    return {
        "format": "gpipe-profile/1", "model": "llama-like",
        "device": {"name": "cpu", "kind": "cpu", "memory_bytes": 10**9},
        "dtype": "float32", "microbatch_sizes": [1, 2],
        "layers": [
            layer("embed", outputs=[{"name": "hidden", "bytes": [100, 200]},
                                    {"name": "mask", "bytes": 16, "grad": False},
                                    {"name": "cos", "bytes": [8, 8], "grad": False},
                                    {"name": "sin", "bytes": [8, 8], "grad": False}]),
            layer("block0"), layer("block1"), layer("head"),
        ],
        "edges": [[0, 1, [0, 1, 2, 3]], [0, 2, [1, 2, 3]], [1, 2], [2, 3], [0, 3, []]],
        "tied": [{"name": "embed.weight", "bytes": 400, "layers": [0, 3]}],
    }


def llama_like() -> Profile:
    """``llama_like_dict`` loaded."""
    return profile_from_dict(llama_like_dict())


def random_ties(rng: random.Random, n: int, count: int) -> tuple[TiedParam, ...]:
    """Up to ``count`` tied parameters, each used by 2-3 distinct layers of n."""
    ties = []
    for t in range(count if n >= 2 else 0):
        layers = tuple(sorted(rng.sample(range(n), rng.randint(2, min(3, n)))))
        ties.append(TiedParam(f"tied{t}", 4 * rng.randint(1, 300), layers))
    return tuple(ties)


def with_values(rng: random.Random, prof: Profile, ties: int = 2) -> Profile:
    """``prof`` with traced-like values: about half of its layers list 1-3 outputs (random
    bytes, some without gradient), their edges read random subsets (some ``[]``: ordering
    only, some the 2-element form), and up to ``ties`` tied parameters."""
    n, sizes = prof.num_layers, prof.microbatch_sizes
    layers = list(prof.layers)
    for i in range(n):
        if rng.random() < 0.5:
            outs = tuple(OutputValue(f"v{i}_{j}", tuple(float(rng.randint(0, 1000)) * s / sizes[0]
                                                         for s in sizes), rng.random() < 0.7)
                         for j in range(rng.randint(1, 3)))
            layers[i] = dataclasses.replace(layers[i], outputs=outs)
    edges = prof.edges if prof.edges is not None else tuple((i, i + 1) for i in range(n - 1))
    reads: list[tuple[int, ...] | None] = []
    for u, _ in edges:
        outs = layers[u].outputs
        if outs is None or rng.random() < 0.2:
            reads.append(None)
        else:
            reads.append(tuple(sorted(rng.sample(range(len(outs)), rng.randint(0, len(outs))))))
    return dataclasses.replace(prof, layers=tuple(layers), edges=edges, edge_values=tuple(reads),
                               tied=random_ties(rng, n, rng.randint(0, ties)))


def chain_with_values(rng: random.Random, prof: Profile) -> Profile:
    """A chain profile (no edges) whose layers list 1-3 outputs half the time (some without
    gradient: each crosses the cut on its own) and with up to 2 tied parameters."""
    sizes = prof.microbatch_sizes
    layers = tuple(dataclasses.replace(lay, outputs=tuple(
        OutputValue(f"v{i}_{j}", tuple(float(rng.randint(0, 1000)) * s / sizes[0]
                                       for s in sizes),
                    rng.random() < 0.7) for j in range(rng.randint(1, 3))))
        if rng.random() < 0.5 else lay for i, lay in enumerate(prof.layers))
    return dataclasses.replace(prof, layers=layers,
                               tied=random_ties(rng, prof.num_layers, rng.randint(0, 2)))


def schedule_from_rows(name: str, rows: Sequence[Sequence[str]]) -> Schedule:
    """A schedule from per-stage lists of action texts, e.g. ``[["0F0", "0B0"]]``."""
    return Schedule.parse("\n".join(f"{k}: {' '.join(row)}" for k, row in enumerate(rows)), name)


def listed_schedule(stages: int, microbatches: int) -> Schedule:
    """A schedule as the synthesiser makes them: list-scheduled from unequal stage times; on
    four stages in the V shape (two per rank), on three with full backwards (no split)."""
    times = (1.0, 2.5, 0.5, 1.5)[:stages]
    costs = Costs(times, tuple(t * 1.3 for t in times), tuple(t * 0.6 for t in reversed(times)),
                  (0.2,) * stages, (0.1,) * stages, split=stages != 3)
    placement = v_placement(2) if stages == 4 else tuple(range(stages))
    return list_schedule(costs, placement, microbatches, [2] * stages, "listed")
