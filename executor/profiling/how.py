"""In words, how a profile's figures were measured: the text of its ``how`` field.

    >>> text = chain_how(torch.device("cpu"), "model", "wall", 3, 10, True, 1, None, 0)
    >>> text.startswith("Each layer timed inside forward+backward passes of the whole model")
    True

One module for the chain and the graph profilers, so that what they share reads the same.
"""

from __future__ import annotations

import torch

from executor.graphs.layers import LayerGraph
from partitioner.formats.device import IN_STEP_HOW

__all__ = ["chain_how", "graph_how", "split_how", "split_method"]


def split_method(timing: str) -> str:
    """The harness's ``split_backward``: how I and W were measured, in a few words.

        >>> split_method("model")
        'deferring, one WeightGrads per layer, in further whole-model passes'
    """
    where = "in further whole-model passes" if timing == "model" else \
        "in further repetitions of each layer alone"
    return f"deferring, one WeightGrads per layer, {where}"


def split_how(timing: str) -> str:
    """The sentence of a profile's ``how`` that says how its split backward was measured
    (``timing``: "model", the layers inside passes of the whole model, or "layer", alone)."""
    if timing == "model":
        where = ("as many further passes of the whole model, each layer's forward under "
                 "executor.runtime.splitgrad.deferring with a WeightGrads store of its own")
        i_is = "the layer's backward span in those passes, between the same marks"
        w_is = "its store's run, timed layer by layer after the backward, the last layer first"
    else:
        where = ("as many further repetitions of each layer alone, its forward under "
                 "executor.runtime.splitgrad.deferring")
        i_is = "its backward (less the backward-call overhead where corrected)"
        w_is = "its store's run, after a cache flush where flushing"
    return (f"split backward from {where}: bwd_input_ms (I) = {i_is}, input gradients only "
            f"(the weight gradients of linear and addmm calls on parameters deferred, all "
            f"others computed in I); bwd_weight_ms (W) = {w_is}, the deferred weight "
            f"gradients accumulated into .grad, 0 for a layer with nothing deferred; each W "
            f"includes one gradient-accumulation call, which a stage's W pays once for all "
            f"its layers; bwd_ms stays the fused backward")


def chain_how(dev: torch.device, used: str, clock: str, warmup: int, repeat: int, train: bool,
              threads: int, overhead: tuple[float, float] | None, flush_bytes: int,
              split: bool = False) -> str:
    """A chain profile's ``how``: in words, how its figures were measured (``used``: "model"
    or "layer", ``overhead``: the (fwd, bwd) ms subtracted, None if not corrected, ``split``:
    the split backward was measured too)."""
    timer = {"wall": "time.perf_counter", "thread": "time.thread_time, the thread's CPU time"}
    clocked = (f"{'CUDA events, synchronised' if dev.type == 'cuda' else timer[clock]}; "
               f"median of {repeat} after {warmup} warm-up")
    mode = f"{'training' if train else 'eval'} mode, {threads} intra-op thread(s)"
    if used == "model":
        parts = [f"Each layer {IN_STEP_HOW} on a copy "
                 f"({clocked}): marks between layers in the forward, hooks at each layer's "
                 f"inputs in the backward; {mode}",
                 "the parameters' gradients accumulating as in a training step"]
    else:
        parts = [f"Each layer timed alone on a copy ({clocked}), input from a real forward "
                 f"pass of the layers before it, {mode}",
                 "backward into .grad of the floating inputs and the parameters, the "
                 "parameters' gradients accumulating as in a training step",
                 (f"per-call harness overhead measured on no-op layers (fwd {overhead[0]:.4f} "
                  f"ms, bwd {overhead[1]:.4f} ms) and subtracted" if overhead is not None
                  else "per-call harness overhead not corrected")]
    parts.append("saved_bytes = unique storages autograd saves for backward, parameters "
                 "and buffers excluded, measured on each layer alone; saved_input_bytes and "
                 "saved_output_bytes = those of them that are the layer's input and output")
    if flush_bytes:
        parts.append(f"caches flushed with {flush_bytes} bytes before each timed region")
    if dev.type == "cuda":
        parts.append("peak_bytes = allocator peak of one forward+backward above what was "
                     "allocated before it")
    if split:
        parts.append(split_how(used))
        parts.append("held_for_w_bytes = unique storages the deferred weight gradients keep "
                     "from I until W (each split linear's input and output gradient), on each "
                     "layer alone; held_for_w_input_bytes = those of them that are its input")
    return "; ".join(parts) + "."


def graph_how(graph: LayerGraph, dev: torch.device, clock: str, warmup: int, repeat: int,
              train: bool, threads: int, split: bool = False) -> str:
    """A graph profile's ``how``: in words, how its figures were measured (``split``: the split
    backward was measured too)."""
    timer = {"wall": "time.perf_counter", "thread": "time.thread_time, the thread's CPU time"}
    clocked = f"{'CUDA events' if dev.type == 'cuda' else timer[clock]}"
    return (f"Traced with {graph.capture.tracer} into {graph.num_layers} layers; each layer "
            f"{IN_STEP_HOW} run layer by layer "
            f"({clocked}; median of {repeat} after {warmup} warm-up): marks between layers in "
            f"the forward, in the backward one alias node per layer boundary over the values "
            f"crossing it (autograd runs nodes in reverse creation order, so the backward "
            f"splits at the boundaries); {'training' if train else 'eval'} mode, {threads} "
            f"intra-op thread(s); the parameters' gradients accumulating as in a training "
            f"step; saved_bytes = unique storages autograd saves for backward in each layer's "
            f"forward, parameters and buffers excluded; a tied parameter's bytes in its first layer only"
            + (f"; {split_how('model')}; held_for_w_bytes = unique storages each layer's "
               f"deferred weight gradients keep from I until W, after one forward and "
               f"backward of the whole model (held_for_w_input_bytes: of its inputs)."
               if split else "."))
