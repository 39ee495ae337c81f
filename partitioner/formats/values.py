"""The values that flow between layers: one normalised form of a profile's outputs and edges.

    >>> from partitioner import load_profile
    >>> vals = profile_values(load_profile("h200/gpt2-medium"))
    >>> v = vals.values[0]
    >>> v.producer, v.name, v.consumers, v.grad, len(vals.values)
    (0, '0', (1,), True, 26)

A value has a producer layer, a name, bytes per micro-batch size, a grad flag and its consumer
layers. A layer that lists ``outputs`` has one value per output; any other layer has exactly
one, its whole output (named as the layer, ``out_bytes``, grad true). An edge ``[u, v]`` makes
v a consumer of every value of u; ``[u, v, [j, ...]]`` of u's outputs j only (``[]``: none,
an ordering-only edge). The one rule of every cost: *a value x of layer u goes from stage(u)
to each other stage d that holds a consumer of x, once per (x, d)*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from partitioner.formats.layers import layer_edges
from partitioner.formats.profile import Profile

__all__ = ["Message", "ProfileValues", "Value", "profile_values"]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Value:
    """One value: produced by layer ``producer``, read by the layers ``consumers`` (sorted)."""

    producer: int
    name: str
    bytes: tuple[float, ...]  # one per micro-batch size of the profile
    grad: bool
    consumers: tuple[int, ...]


@dataclass(frozen=True)
class ProfileValues:
    """Every value of a profile (in layer order, then output order) and array forms of them
    for the cost model (index x = position in ``values``)."""

    values: tuple[Value, ...]
    edge_reads: tuple[tuple[int, ...], ...]  # per edge of layer_edges(profile): the x it carries
    first: tuple[int, ...]  # layer u's values are first[u]..first[u+1]-1 (L+1 entries)
    producer: IntArray  # (X,)
    grad: BoolArray  # (X,)
    table: FloatArray  # (X, sizes): bytes at each measured micro-batch size
    pair_value: IntArray  # consumer pairs (x, v), sorted by x then v: the x ...
    pair_layer: IntArray  # ... and the v
    whole: bool  # every value is a layer's whole output (no layer lists outputs)

    def of_layer(self, u: int) -> range:
        """Indices of layer u's values."""
        return range(self.first[u], self.first[u + 1])


def profile_values(profile: Profile) -> ProfileValues:
    """The values of ``profile``, each with its consumers (see the module docstring)."""
    edges = layer_edges(profile)
    reads = profile.edge_values or (None,) * len(edges)
    if len(reads) != len(edges):
        raise ValueError(f"the profile has {len(edges)} edges but {len(reads)} edge_values; "
                         f"give one entry per edge (None: the edge reads all of its source)")
    first = [0]
    for lay in profile.layers:
        first.append(first[-1] + (len(lay.outputs) if lay.outputs is not None else 1))
    consumers: list[set[int]] = [set() for _ in range(first[-1])]
    edge_reads = []
    for (u, v), picked in zip(edges, reads, strict=True):
        if picked is None:
            xs = tuple(range(first[u], first[u + 1]))
        elif profile.layers[u].outputs is None:
            raise ValueError(f"edge {u} -> {v} reads outputs {list(picked)} of layer {u}, which "
                             f"lists no outputs; give the layer its outputs or read all of it")
        else:
            xs = tuple(first[u] + j for j in picked)
        for x in xs:
            consumers[x].add(v)
        edge_reads.append(xs)
    values, rows = [], []
    for u, lay in enumerate(profile.layers):
        outs = lay.outputs
        listed = [(lay.name, lay.out_bytes, True)] if outs is None else [
            (o.name, o.bytes, o.grad) for o in outs]
        for j, (name, size, grad) in enumerate(listed):
            x = first[u] + j
            values.append(Value(u, name, tuple(size), grad, tuple(sorted(consumers[x]))))
            rows.append(size)
    pairs = [(x, v) for x, val in enumerate(values) for v in val.consumers]
    pair_arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    n_sizes = len(profile.microbatch_sizes)
    return ProfileValues(
        values=tuple(values), edge_reads=tuple(edge_reads), first=tuple(first),
        producer=np.array([val.producer for val in values], dtype=np.int64),
        grad=np.array([val.grad for val in values], dtype=bool),
        table=np.array(rows, dtype=np.float64).reshape(-1, n_sizes),
        pair_value=pair_arr[:, 0].copy(), pair_layer=pair_arr[:, 1].copy(),
        whole=all(lay.outputs is None for lay in profile.layers))


@dataclass(frozen=True)
class Message:
    """What one stage sends another per micro-batch: the values (names, in profile order),
    their bytes, and the bytes of the gradients that come back (of the values with grad)."""

    values: tuple[str, ...]
    bytes: float
    grad_bytes: float
