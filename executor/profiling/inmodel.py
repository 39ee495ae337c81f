"""Time every layer inside forward+backward passes of the whole model, not alone.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> times = time_layers_in_model(model, torch.ones(4, 8), torch.device("cpu"), repeat=3)
    >>> len(times), all(f >= 0 and b >= 0 for f, b, _ in times)
    (3, True)

A layer timed alone runs in a context the model never gives it: its input, weights and output
buffers are hot in the caches from its own previous repetition, and each call pays the
harness's launch and backward-call costs once per layer. Inside the model a layer writes its
activations to fresh memory, reads saved tensors that the rest of the forward pushed out of the
caches, and shares one autograd run with every other layer. On a CPU these differ for small
convolutional layers (README, "Profile a model"), and no per-call correction recovers it. So,
where the whole model
fits on the device, the profiler times each layer where it really runs:

- forward: clock marks at the start and end of each layer in one forward pass;
- backward: one backward pass of the whole model. Before each layer but the first, one autograd
  node of its own takes the layer's inputs that need a gradient and hands the layer aliases of
  them (new tensors on the same storage: no copy); hooks on that node mark when autograd
  reaches it (every gradient of the layer's inputs is then done: the layer's backward has
  ended) and when it has run it (the backward of the layer before starts). A layer's backward
  is the time between the marks at its output and at its input (from the start of the
  backward for the last layer, to its end for the first and for a layer whose input needs no
  gradient).

Why a node per layer rather than a hook on each input tensor: layers that pass a tuple on often
pass some of its tensors through unchanged (a U-Net's skips, a gate every block reads), so the
same tensor is an input of several layers, and a hook on it fires only once its last consumer,
the earliest of those layers, is done. An alias is a distinct tensor at each layer, so its
gradient is done with the layer's own backward; and of the nodes ready to run, autograd runs
the one made last first, so the node before layer i runs right after layer i's backward,
before any of layer i-1's. Tensors that need no gradient (integer ids, masks) pass as they
are. The aliases are not views, so an in-place layer (``nn.ReLU(inplace=True)``) stacks its op
on the node, as on any tensor, instead of replacing it; they share their tensor's version
counter, so autograd's checks on in-place changes are those of the model without them. A hook
a layer puts on its own input sees the gradient that comes through that layer and the ones
after it (as on a pipeline stage's input), not also what the layers before add to the tensor.

The marks are ``measure.Clock`` marks (CUDA events on a GPU, recorded on the stream autograd
runs on). The nodes run between the marks, outside every layer, so the layers' times add up to
the model's own forward and backward by construction except for the hooks themselves
(microseconds each).

Split backward (``time_split_in_model``, for zero-bubble schedules): further passes of the
same kind, each layer's forward under ``splitgrad.deferring`` with a ``WeightGrads`` store of
its own, so every deferred weight gradient is the work of the layer that recorded it::

    F   layer i under deferring(stores[i])     marks as above
    I   one backward of the whole model        layer i's span between the alias marks = I(i)
    W   stores[L-1].run(), ..., stores[0].run()   marks around each run = W(i); 0 if empty

Each W pays one autograd call to accumulate its gradients, which a stage's W, one store for
all its layers, pays once.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from executor.profiling.measure import (
    Clock,
    Measurement,
    as_batch,
    as_tensors,
    quiet_gc,
)
from executor.runtime.batch import Batch, like
from executor.runtime.splitgrad import WeightGrads, deferring

__all__ = ["Alias", "Mark", "marked_aliases", "time_layers_in_model", "time_split_in_model",
           "weight_passes", "whole_model_bytes"]

Mark = float | torch.cuda.Event


def time_layers_in_model(model: nn.Sequential, x: Batch, device: torch.device, *,
                         warmup: int = 2, repeat: int = 5,
                         clock: str = "wall") -> list[tuple[float, float, bool]]:
    """Per layer of ``model`` (already on ``device``): median (fwd_ms, bwd_ms, has_backward)
    over ``repeat`` forward+backward passes of the whole model on ``x`` after ``warmup``.

    The backward starts from ones at the model's output(s) and accumulates into parameter
    gradients that already exist (as every micro-batch after a step's first does); the
    model's own ``.grad`` are put back afterwards. ``has_backward``: some output of the layer
    requires grad (the layer takes part in the backward pass).
    """
    passes, has_backward = _passes(model, x, device, warmup, repeat, clock, split=False)
    return [(statistics.median(p[0][i] for p in passes),
             statistics.median(p[1][i] for p in passes) if has else 0.0, has)
            for i, has in enumerate(has_backward)]


def time_split_in_model(model: nn.Sequential, x: Batch, device: torch.device, *,
                        warmup: int = 2, repeat: int = 5,
                        clock: str = "wall") -> list[tuple[float, float]]:
    """Per layer of ``model``: median (bwd_input_ms, bwd_weight_ms), I and W, over ``repeat``
    passes of the whole model whose forward defers the weight gradients (module docstring),
    after ``warmup``; gradients accumulate and are put back as in ``time_layers_in_model``.

        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> split = time_split_in_model(model, torch.ones(4, 8), torch.device("cpu"), repeat=3)
        >>> [w > 0 for _, w in split], all(i >= 0 for i, _ in split)
        ([True, False, True], True)
    """
    passes, has_backward = _passes(model, x, device, warmup, repeat, clock, split=True)
    return [(statistics.median(p[1][i] for p in passes) if has else 0.0,
             statistics.median(p[2][i] for p in passes))
            for i, has in enumerate(has_backward)]


_Pass = tuple[list[float], list[float], list[float]]  # per layer: fwd, bwd (or I), W ms


def _passes(model: nn.Sequential, x: Batch, device: torch.device, warmup: int, repeat: int,
            clock: str, split: bool) -> tuple[list[_Pass], list[bool]]:
    """The timed passes (after ``warmup``), and whether each layer has a backward."""
    layers = list(model)
    params = [p for p in model.parameters() if p.requires_grad]
    own_grads = [p.grad for p in params]
    timer = Clock(device, clock)
    passes: list[_Pass] = []
    has_backward = [False] * len(layers)
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        with torch.enable_grad(), quiet_gc():
            for r in range(warmup + repeat):
                stores = [WeightGrads() for _ in layers] if split else None
                f_ms, b_ms, w_ms, has_backward = _one_pass(layers, x, timer, stores)
                if r >= warmup:
                    passes.append((f_ms, b_ms, w_ms))
    finally:
        for p, g in zip(params, own_grads, strict=True):
            p.grad = g
    return passes, has_backward


def _one_pass(layers: list[nn.Module], x: Batch, clock: Clock,
              stores: list[WeightGrads] | None = None
              ) -> tuple[list[float], list[float], list[float], list[bool]]:
    """One forward and one backward of the chain on a fresh copy of ``x``: per-layer
    milliseconds of each, of each W (all 0 without ``stores``), and whether each layer's
    output requires grad. With ``stores`` (one per layer), layer i's forward runs under
    ``deferring(stores[i])``, so the backward is I, and each store's W runs after it."""
    h = like(x, [t.clone() for t in as_tensors(x, "input")])
    fwd_marks: list[Mark] = []  # each layer's start and end: the aliases lie between layers
    at_node: list[list[Mark]] = [[] for _ in layers]  # autograd before/after layer i's node
    outs_grad: list[bool] = []
    for i, layer in enumerate(layers):
        if i > 0:
            h = _alias(h, at_node[i], clock)
        with deferring(stores[i], layer) if stores is not None else nullcontext():
            fwd_marks.append(clock.mark())
            h = as_batch(layer(h), f"the output of layer {i}")
            fwd_marks.append(clock.mark())
        outs_grad.append(any(t.requires_grad for t in as_tensors(h, "output")))
    roots = [t for t in as_tensors(h, "output") if t.requires_grad]
    start = clock.mark()
    if roots:
        torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])
    end = clock.mark()
    w_ms = weight_passes(stores, clock) if stores is not None else [0.0] * len(layers)
    # layer i's backward ends where autograd reaches the node before it (every gradient has
    # then passed through the layer) and layer i-1's starts once that node has run; a layer
    # whose input needs no gradient ends with the pass
    bwd_marks = [start]
    for marks in reversed(at_node[1:]):
        bwd_marks += marks if marks else [end, end]
    spans = clock.elapsed_ms([*bwd_marks, end])[::2]  # the last layer's backward first
    return (clock.elapsed_ms(fwd_marks)[::2], [max(0.0, s) for s in reversed(spans)], w_ms,
            outs_grad)


def weight_passes(stores: Sequence[WeightGrads], clock: Clock) -> list[float]:
    """W of each store, the last first (the order of the backward), timed one by one: per
    store, its milliseconds, 0.0 for a store with nothing deferred (not run)."""
    marks: list[list[Mark]] = []
    for store in reversed(stores):
        if len(store):
            start = clock.mark()
            store.run()
            marks.append([start, clock.mark()])
        else:
            marks.append([])
    return [clock.elapsed_ms(m)[0] if m else 0.0 for m in reversed(marks)]


class Alias(torch.autograd.Function):
    """Identity on tensors as one autograd node: new tensors on the same storage, no copy."""

    @staticmethod
    def forward(ctx: Any, *ts: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)  # an alias no one reads gets no gradient of zeros
        return tuple(t.detach() for t in ts)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        return grads


def _alias(h: Batch, sink: list[Mark], clock: Clock) -> Batch:
    """``h`` with its tensors that need a gradient replaced by aliases that one new autograd
    node makes, with hooks that mark in ``sink`` when autograd reaches that node and when it
    has run it."""
    ts = list(as_tensors(h, "input"))
    grads = [k for k, t in enumerate(ts) if t.requires_grad]
    if not grads:
        return h
    aliases = marked_aliases([ts[k] for k in grads], sink, clock)
    for k, alias in zip(grads, aliases, strict=True):
        ts[k] = alias
    return like(h, ts)


def marked_aliases(tensors: Sequence[Tensor], sink: list[Mark], clock: Clock
                   ) -> tuple[Tensor, ...]:
    """Aliases of ``tensors`` made by one new autograd node, whose hooks mark in ``sink`` when
    autograd reaches the node and when it has run it (``tensors`` must not be empty)."""
    aliases: tuple[Tensor, ...] = Alias.apply(*tensors)  # type: ignore[no-untyped-call]
    node = aliases[0].grad_fn
    assert node is not None

    def mark(*_grads: object) -> None:
        sink.append(clock.mark())
    node.register_prehook(mark)
    node.register_hook(mark)
    return aliases


def whole_model_bytes(per_layer: Sequence[Sequence[Measurement]], param_bytes: Sequence[int]
                      ) -> int:
    """Device memory a forward+backward of the whole model at the largest size needs, from
    its layers measured alone: a copy of the parameters and their gradients, every layer's
    saved tensors, and the largest output twice over (an output and its gradient in flight).

        >>> m = Measurement(0, 0, True, 64, 32, 64, None, torch.ones(1))  # in 64, out 32, saved 64
        >>> whole_model_bytes([[m], [m]], [100, 0])
        392
    """
    saved = max(sum(row[j].saved_bytes for row in per_layer)
                for j in range(len(per_layer[0])))
    largest = max(m.out_bytes for row in per_layer for m in row)
    return 2 * sum(param_bytes) + saved + 2 * largest
