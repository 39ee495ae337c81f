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
caches, and shares one autograd run with every other layer. On a CPU these differ by 5-15% for
small convolutional layers, and no per-call correction recovers it. So, where the whole model
fits on the device, the profiler times each layer where it really runs:

- forward: a clock mark between successive layers of one forward pass;
- backward: one backward pass of the whole model, with a hook on each layer's input; it fires
  when autograd has finished that layer's gradient for it, which is the boundary between the
  layer's backward and the one before it. A layer's backward is the time between the hooks on
  its output and on its input (from the start of the backward for the last layer, to its end
  for a layer whose input needs no gradient).

The marks are ``measure.Clock`` marks (CUDA events on a GPU, recorded on the stream autograd
runs on), so the layers' times add up to the model's own forward and backward by construction
except for the hooks themselves (microseconds each).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from executor.profiling.measure import (
    Clock,
    Measurement,
    as_batch,
    as_tensors,
    quiet_gc,
    rebuild_batch,
)
from executor.runtime.batch import Batch

__all__ = ["time_layers_in_model", "whole_model_bytes"]

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
    layers = list(model)
    params = [p for p in model.parameters() if p.requires_grad]
    own_grads = [p.grad for p in params]
    timer = Clock(device, clock)
    fwd: list[list[float]] = [[] for _ in layers]
    bwd: list[list[float]] = [[] for _ in layers]
    has_backward = [False] * len(layers)
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        with torch.enable_grad(), quiet_gc():
            for r in range(warmup + repeat):
                f_ms, b_ms, has_backward = _one_pass(layers, x, timer)
                if r >= warmup:
                    for i in range(len(layers)):
                        fwd[i].append(f_ms[i])
                        bwd[i].append(b_ms[i])
    finally:
        for p, g in zip(params, own_grads, strict=True):
            p.grad = g
    return [(statistics.median(f), statistics.median(b) if has else 0.0, has)
            for f, b, has in zip(fwd, bwd, has_backward, strict=True)]


def _one_pass(layers: list[nn.Module], x: Batch, clock: Clock
              ) -> tuple[list[float], list[float], list[bool]]:
    """One forward and one backward of the chain on a fresh copy of ``x``: per-layer
    milliseconds of each, and whether each layer's output requires grad."""
    n = len(layers)
    h = rebuild_batch(x, [t.clone() for t in as_tensors(x, "input")])
    fwd_marks = [clock.mark()]
    in_marks: list[list[Mark]] = [[] for _ in range(n)]  # hooks on layer i's inputs
    outs_grad: list[bool] = []
    for i, layer in enumerate(layers):
        if i > 0:
            for t in as_tensors(h, "input"):
                if t.requires_grad:
                    t.register_hook(_marker(in_marks[i], clock))  # type: ignore[no-untyped-call]
        h = as_batch(layer(h), f"the output of layer {i}")
        fwd_marks.append(clock.mark())
        outs_grad.append(any(t.requires_grad for t in as_tensors(h, "output")))
    roots = [t for t in as_tensors(h, "output") if t.requires_grad]
    start = clock.mark()
    if roots:
        torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])
    end = clock.mark()
    # ends[i]: when layer i's backward ended (the last hook on its inputs: autograd has then
    # passed every gradient through it); a layer whose input needs no gradient ends with the pass
    ends = [marks[-1] if marks else end for marks in in_marks]
    spans = clock.elapsed_ms([start, *reversed(ends)])  # the last layer's backward first
    return clock.elapsed_ms(fwd_marks), [max(0.0, s) for s in reversed(spans)], outs_grad


def _marker(sink: list[Mark], clock: Clock) -> Callable[[Tensor], None]:
    def hook(_grad: Tensor) -> None:
        sink.append(clock.mark())
    return hook


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
