"""Time and measure every layer of a traced graph inside forward+backward passes of the whole model.

    >>> import torch
    >>> from torch import nn
    >>> from executor.graphs.layers import trace_model
    >>> g = trace_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)), torch.ones(2, 4))
    >>> t = time_graph_layers(g, g.inputs_of((torch.ones(2, 4),), {}), Clock(torch.device("cpu")), repeat=3)
    >>> len(t.fwd_ms), all(f >= 0 for f in t.fwd_ms + t.bwd_ms)
    (3, True)

The layers run in order on an env of values, as the pipeline runs them (``LayerGraph.run_layers``).

- forward: clock marks at the start and end of each layer in one forward pass;
- backward: one backward pass of the whole model, from ones at the model's output tensors.
  Before layer i > 0, one autograd node of its own (an alias: new tensors on the same
  storage, no copy) takes every value that crosses the cut between layers < i and layers >= i
  and carries a gradient, and the env holds its aliases from then on; hooks mark when
  autograd reaches the node and when it has run it.

Why the cut, and why the backward splits exactly at these nodes although a DAG's backward is
no reverse chain: autograd runs, of the nodes that are ready, the one made last first
(``sequence_nr``), and every node waits only for nodes made after it (its consumers), so
whenever a node is still to run some later-made node is ready before it: the backward runs
its nodes in exactly the reverse of the order they were made. The forward makes layer i-1's
nodes, then the cut node i, then layer i's; so in the backward everything between the end of
cut node i+1 and the start of cut node i is layer i's work (its input and weight gradients,
and the sums of gradients of the values it reads), whatever edges jump over it. Cut node i
runs whenever some gradient crosses the cut, that is whenever a layer below it has any
backward work (every path from a layer below to the loss crosses the cut, the model's output
included, as the last layer reads it). So layer i's backward is from the end of cut node i+1
(the start of the backward for the last layer) to the start of cut node i (the end of the
backward for layer 0), and 0 when cut node i+1 did not run. A value read across several cuts
passes through one alias per cut, each a no-op node of microseconds. The layers' times add up
to the pass's own time except for the cut nodes and hooks.

Split backward (``split=True``, for zero-bubble schedules): as many further passes, each layer
run under ``splitgrad.deferring`` with a ``WeightGrads`` store of its own; the backward between
the same cut marks is each layer's I, and each store's run after it, timed one by one
(``inmodel.weight_passes``), its W (0 where nothing was deferred).

Memory (``layer_bytes``): the saved tensors of each layer's forward (autograd's saved-tensor
hooks; unique storages, parameters excluded), the tensor bytes of its input and output values.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from executor.graphs.layers import LayerGraph
from executor.profiling.inmodel import Mark, marked_aliases, weight_passes
from executor.profiling.measure import Clock, quiet_gc
from executor.runtime.memory import ActivationMeter
from executor.runtime.splitgrad import WeightGrads, deferring

__all__ = ["Clock", "GraphTimes", "LayerBytes", "layer_bytes", "time_graph_layers",
           "value_bytes"]



@dataclass(frozen=True)
class GraphTimes:
    """Median per-layer fwd_ms / bwd_ms, and the medians of the whole passes they split; with
    the split backward, per layer I and W, and the medians of the split passes' I and W."""

    fwd_ms: list[float]
    bwd_ms: list[float]
    pass_fwd_ms: float
    pass_bwd_ms: float
    bwd_input_ms: list[float] | None = None
    bwd_weight_ms: list[float] | None = None
    pass_bwd_input_ms: float | None = None
    pass_bwd_weight_ms: float | None = None


@dataclass(frozen=True)
class LayerBytes:
    """Per layer: saved, input and output bytes; per value name: its tensor bytes."""

    saved_bytes: list[int]
    in_bytes: list[int]
    out_bytes: list[int]
    values: dict[str, int]
    held_for_w: tuple[list[int], list[int]] | None = None  # split: kept until W, its inputs'


def _tensors(value: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, Tensor)]


def value_bytes(value: Any) -> int:
    """Bytes of the tensors in a value (a tensor, a tuple of them, ints: 0)."""
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _cuts(graph: LayerGraph) -> list[list[str]]:
    """Per layer i, the values made before it (by layers < i, or the model's inputs) that
    layers >= i read."""
    last_read: dict[str, int] = {}
    for layer in graph.layers:
        for name in layer.inputs:
            last_read[name] = layer.index
    return [[name for name, last in last_read.items()
             if graph.producer[name] < i <= last]
            for i in range(graph.num_layers)]


def _alias_cut(env: dict[str, Any], names: Sequence[str], sink: list[Mark],
               clock: Clock) -> None:
    """Replace the tensors of ``env[names]`` that require a gradient by aliases one new node
    makes, with hooks that mark in ``sink`` when autograd reaches it and when it has run."""
    flat = {name: pytree.tree_flatten(env[name]) for name in names}
    carried = [(name, k) for name in names for k, t in enumerate(flat[name][0])
               if isinstance(t, Tensor) and t.requires_grad]
    if not carried:
        return
    aliases = marked_aliases([flat[name][0][k] for name, k in carried], sink, clock)
    for (name, k), alias in zip(carried, aliases, strict=True):
        flat[name][0][k] = alias
    for name in {name for name, _ in carried}:
        env[name] = pytree.tree_unflatten(*flat[name])


def _fresh(env: Mapping[str, Any]) -> dict[str, Any]:
    """The model's inputs as new tensors (an in-place first op sees the same values each time)."""
    return {k: pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, v)
            for k, v in env.items()}


def _run(graph: LayerGraph, env: dict[str, Any], i: int) -> list[Tensor]:
    """Run layer i on ``env``; the last layer returns the model's output tensors."""
    layer = graph.layers[i]
    assert layer.module is not None
    outs = layer.module(*(env[name] for name in layer.inputs))
    k = len(layer.outputs)
    env.update(zip(layer.outputs, outs[:k], strict=True))
    return _tensors(list(outs[k:]))


_Pass = tuple[list[float], list[float], float, float, list[float]]


def _one_pass(graph: LayerGraph, inputs: Mapping[str, Any], cuts: list[list[str]],
              clock: Clock, stores: list[WeightGrads] | None = None) -> _Pass:
    """Per layer fwd and bwd ms, the whole forward and backward, per layer W ms (0 without
    ``stores``; with them, layer i runs under ``deferring(stores[i])``: the backward is I)."""
    env = _fresh(inputs)
    big_l = graph.num_layers
    fwd_marks: list[Mark] = []
    at_cut: list[list[Mark]] = [[] for _ in range(big_l)]
    out: list[Tensor] = []
    for i in range(big_l):
        if i > 0:
            _alias_cut(env, cuts[i], at_cut[i], clock)
        with deferring(stores[i], graph.layers[i].module) if stores is not None else nullcontext():
            fwd_marks.append(clock.mark())
            out = _run(graph, env, i)
            fwd_marks.append(clock.mark())
    roots = [t for t in out if t.requires_grad]
    start = clock.mark()
    if roots:
        torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])
    end = clock.mark()
    w_ms = weight_passes(stores, clock) if stores is not None else [0.0] * big_l
    # time order: start, [cut L-1 pre, post], ..., [cut 1 pre, post], end; a cut that did not
    # run has no layer with backward work below it
    marks: list[Mark] = [start]
    for i in range(big_l - 1, 0, -1):
        marks += at_cut[i] if at_cut[i] else [end, end]
    spans = clock.elapsed_ms([*marks, end])[::2]  # layer L-1's backward first
    bwd = [max(0.0, s) for s in reversed(spans)]
    for i in range(big_l - 1):
        if not at_cut[i + 1]:
            bwd[i] = 0.0
    fwd = clock.elapsed_ms(fwd_marks)
    total_fwd = sum(fwd)  # marks to marks, the cut nodes between layers included
    bwd_total = clock.elapsed_ms([start, end])[0]
    return fwd[::2], bwd, total_fwd, bwd_total, w_ms


def _medians(rows: Sequence[list[float]]) -> list[float]:
    """Per layer, the median over passes."""
    return [statistics.median(r[i] for r in rows) for i in range(len(rows[0]))]


def time_graph_layers(graph: LayerGraph, inputs: Mapping[str, Any], clock: Clock, *,
                      warmup: int = 2, repeat: int = 5, split: bool = False) -> GraphTimes:
    """Per layer of ``graph``: median fwd_ms and bwd_ms over ``repeat`` forward+backward passes
    of the whole model on ``inputs`` (the env of the model's inputs) after ``warmup``; with
    ``split``, I and W too, from as many further passes (module docstring).

    Parameter gradients accumulate into buffers that already exist (as for every micro-batch
    after a step's first); the model's own ``.grad`` are put back afterwards."""
    params = list(graph.parameters_of(range(graph.num_layers)).values())
    params = [p for p in params if p.requires_grad]
    own = [p.grad for p in params]
    cuts = _cuts(graph)
    rows: list[_Pass] = []
    split_rows: list[_Pass] = []
    big_l = graph.num_layers
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        with torch.enable_grad(), quiet_gc():
            for r in range(warmup + repeat):
                result = _one_pass(graph, inputs, cuts, clock)
                if r >= warmup:
                    rows.append(result)
            for r in range(warmup + repeat if split else 0):  # after, as in inmodel
                stores = [WeightGrads() for _ in range(big_l)]
                result = _one_pass(graph, inputs, cuts, clock, stores)
                if r >= warmup:
                    split_rows.append(result)
    finally:
        for p, g in zip(params, own, strict=True):
            p.grad = g
    times = GraphTimes(_medians([r[0] for r in rows]), _medians([r[1] for r in rows]),
                       statistics.median(r[2] for r in rows),
                       statistics.median(r[3] for r in rows))
    if not split:
        return times
    return dataclasses.replace(times, bwd_input_ms=_medians([r[1] for r in split_rows]),
                               bwd_weight_ms=_medians([r[4] for r in split_rows]),
                               pass_bwd_input_ms=statistics.median(r[3] for r in split_rows),
                               pass_bwd_weight_ms=statistics.median(sum(r[4])
                                                                    for r in split_rows))


def layer_bytes(graph: LayerGraph, inputs: Mapping[str, Any], split: bool = False) -> LayerBytes:
    """One forward with autograd on: each layer's saved bytes (unique storages autograd keeps
    for its backward, parameters and buffers excluded, as the executor counts them:
    ``memory.ActivationMeter``), the bytes of its inputs and outputs, and of every value; with
    ``split``, also what each layer's deferred weight gradients keep from I until W
    (``held_for_w``)."""
    meter = ActivationMeter(nn.ModuleList([layer.module for layer in graph.layers
                                           if layer.module is not None]))
    meter.begin_step()
    env = _fresh(inputs)
    saved, ins, outs = [], [], []
    with torch.enable_grad():
        for layer in graph.layers:
            ins.append(sum(value_bytes(env[name]) for name in layer.inputs))
            with meter.saving() as seen:
                result = _run(graph, env, layer.index)
            saved.append(sum(seen.values()))
            outs.append(sum(value_bytes(env[name]) for name in layer.outputs)
                        + value_bytes(result))
    values = {name: value_bytes(v) for name, v in env.items()}
    del env, result
    held = _held_for_w(graph, inputs, meter) if split else None
    return LayerBytes(saved, ins, outs, values, held)


def _held_for_w(graph: LayerGraph, inputs: Mapping[str, Any],
                meter: ActivationMeter) -> tuple[list[int], list[int]]:
    """Per layer, the unique storages its deferred linears keep from I until W (inputs and
    output gradients: ``WeightGrads``) after one forward under ``deferring`` and its backward
    (I), and of those the layer's inputs'. The parameters' ``.grad`` are put back."""
    params = [p for p in graph.parameters_of(range(graph.num_layers)).values()
              if p.requires_grad]
    own_grads = [p.grad for p in params]
    stores = [WeightGrads() for _ in graph.layers]
    env = _fresh(inputs)
    own: list[dict[int, int]] = []
    try:
        with torch.enable_grad():
            out: list[Tensor] = []
            for layer in graph.layers:
                own.append(meter.storages([env[name] for name in layer.inputs]))
                with deferring(stores[layer.index], layer.module):
                    out = _run(graph, env, layer.index)
            roots = [t for t in out if t.requires_grad]
            if roots:
                torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])
        kept = [meter.storages(store.tensors()) for store in stores]
    finally:
        for store in stores:
            store.clear()
        for p, g in zip(params, own_grads, strict=True):
            p.grad = g
    return ([sum(k.values()) for k in kept],
            [sum(size for ptr, size in k.items() if ptr in mine) for k, mine in zip(
                kept, own, strict=True)])
