"""Graph profiles of any torch model: trace it into layers, time each inside whole passes.

    >>> from executor.workloads.graphmodels import build_graph_model
    >>> w = build_graph_model("tiny-unet", batch=2)
    >>> prof = profile_graph(w.model, w.sample, (1, 2), repeats=1, warmup=0)
    >>> prof.num_layers, prof.layers[0].name, (0, 8) in prof.edges  # downs.0 -> ups.2: a skip
    (10, 'downs.0', True)

The model is traced into a ``LayerGraph`` (``executor.graphs.layers.trace_model``: torch.fx,
else torch.export), with ``leaves`` and ``max_layers`` as given, in the mode it is profiled in
(training by default). At each micro-batch size b (the sample's batched tensors resized to b,
rows taken cyclically), one forward with saved-tensor hooks counts each layer's memory, and
``warmup + repeats`` forward+backward passes of the whole model, run layer by layer on an env
of values as a pipeline runs them, time each layer where it really runs
(``executor.profiling.graphtime``: marks between layers in the forward; in the backward, one
alias node per layer boundary over the values that cross it, so the reverse-creation order
in which autograd runs a DAG's backward splits exactly at the boundaries). The layers' times
add up to the whole pass's time, except for the boundary nodes' hooks. With ``split_backward``
(the default), as many further passes, each layer under ``executor.runtime.splitgrad.deferring``,
give each layer's ``bwd_input_ms`` (I) and ``bwd_weight_ms`` (W); ``bwd_ms`` stays the fused one.

The profile lists every layer's ``outputs`` (the values other layers read: graph node names,
their bytes at each size, whether a gradient flows back), ``edges`` ``[u, v, [indices into
u's outputs]]`` (``[]``: ordering only), ``tied`` parameters (counted in ``param_bytes`` of
their first layer only) and, under ``extra["trace"]``, how it was traced (tracer, leaves,
max_layers, layer names) so the executor can trace the same way and check the names. The
model is left as it was: parameters, gradients, buffers (BatchNorm statistics), each module's
``training`` flag, the random state and torch's thread count.
"""

from __future__ import annotations

import copy
import datetime
import gc
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from executor.graphs.blocks import Leaf
from executor.graphs.layers import LayerGraph, as_call, trace_model
from executor.profiling.graphtime import (
    Clock,
    GraphTimes,
    LayerBytes,
    layer_bytes,
    time_graph_layers,
)
from executor.profiling.how import graph_how, split_method
from executor.profiling.measure import loss_bytes, timing_problems
from executor.profiling.samples import describe_sample, move_sample, resize_sample
from executor.runtime.allocator import keep_freed_memory as keep_memory
from executor.runtime.devices import device_info, parse_dtype, resolve_device
from partitioner.formats.profile import LayerProfile, OutputValue, Profile, TiedParam
from partitioner.formats.profile_loss import LossProfile

__all__ = ["leaf_names", "profile_graph", "profile_traced"]


def leaf_names(leaves: Sequence[Leaf]) -> list[str]:
    """Leaves as the profile records them: ``module:Class`` for a class, a pattern as it is.

        >>> leaf_names([nn.Linear, "layers.*"])
        ['torch.nn.modules.linear:Linear', 'layers.*']
    """
    return [f"{leaf.__module__}:{leaf.__qualname__}" if isinstance(leaf, type) else str(leaf)
            for leaf in leaves]


@contextmanager
def _kept(model: nn.Module, threads: int | None) -> Iterator[None]:
    """Put back the model's buffers, its modules' training flags, the random state, torch's
    thread count and grad mode afterwards."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    old_threads, grad_mode = torch.get_num_threads(), torch.is_grad_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(old_threads)
        torch.set_grad_enabled(grad_mode)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode


def _check(sizes: Sequence[int], repeats: int, warmup: int, threads: int | None,
           clock: str) -> list[int]:
    """Validate at the boundary; every problem in one message."""
    problems = []
    bad = [b for b in sizes if not (isinstance(b, int) and not isinstance(b, bool) and b >= 1)]
    if not sizes or bad:
        problems.append(f"micro-batch sizes {list(sizes)!r} must be whole numbers >= 1")
    problems += timing_problems(warmup, repeats, threads, clock)
    if problems:
        raise ValueError("cannot profile: " + "; ".join(problems))
    return sorted({int(b) for b in sizes})


def _where(model: nn.Module, device: str | torch.device | None, dtype: torch.dtype | None
           ) -> tuple[nn.Module, torch.device]:
    """The model to profile: the model itself where it is already on ``device`` in ``dtype``
    (its state is put back afterwards), else a copy moved and cast there."""
    first = next(iter(model.parameters()), None)
    at = first.device if first is not None else torch.device("cpu")
    dev = at if device is None else resolve_device(device)
    same_dtype = dtype is None or all(p.dtype == dtype for p in model.parameters()
                                      if p.is_floating_point())
    if dev == at and same_dtype:
        return model, dev
    twin = copy.deepcopy(model)
    twin.to(device=dev) if dtype is None else twin.to(device=dev, dtype=dtype)
    return twin, dev


def _layer_type(model: nn.Module, name: str) -> str:
    """The class of the module a layer is named after ('+'-joined for code between blocks)."""
    types = []
    for path in name.split("#")[0].split("+"):
        try:
            types.append(type(model.get_submodule(path)).__name__)
        except AttributeError:
            continue
    return "+".join(dict.fromkeys(types)) or "ops"


def _params(graph: LayerGraph) -> tuple[list[int], tuple[TiedParam, ...]]:
    """Per layer, the bytes of the parameters it owns (a tied one at its first layer only),
    and the tied parameters."""
    owner: dict[int, int] = {}
    owned = [0] * graph.num_layers
    for layer in graph.layers:
        for p in graph.parameters_of([layer.index]).values():
            if id(p) not in owner:
                owner[id(p)] = layer.index
                owned[layer.index] += p.numel() * p.element_size()
    named = graph.parameters_of(range(graph.num_layers))
    tied = tuple(TiedParam(name, named[name].numel() * named[name].element_size(),
                           tuple(sorted(layers)))
                 for name, layers in graph.tied().items())
    return owned, tied


def profile_graph(model: nn.Module, sample: Any, microbatch_sizes: Sequence[int] = (1, 2, 4),
                  *, leaves: Sequence[Leaf] = (), max_layers: int | None = None,
                  repeats: int = 5, warmup: int = 2, name: str | None = None,
                  device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, tracer: str = "auto",
                  threads: int | None = None, clock: str = "wall", train: bool = True,
                  input_info: Mapping[str, Any] | None = None,
                  progress: Callable[[str], None] | None = None,
                  split_backward: bool = True,
                  loss: tuple[Callable[[Any, Any], torch.Tensor], Any] | None = None) -> Profile:
    """A ``gpipe-profile/1`` Profile of ``model``'s traced layer graph on ``sample`` (a tensor,
    a tuple of positional tensors or a dict of keyword tensors; any batch), one column per
    micro-batch size (see the module docstring).

    ``device`` (default: where the model is) and ``dtype`` (default: the model's) profile a
    copy moved there when they differ; ``clock`` on the CPU is ``"wall"`` or ``"thread"``
    (needs threads=1); ``train`` profiles in training mode; ``progress(text)`` is called
    after each size; ``split_backward`` also measures each layer's I and W; ``loss=(loss_fn,
    target)`` (a target of at least the largest size's rows) what the loss keeps on the last
    stage at each size, from the model's output there (the profile's ``loss``)."""
    sizes = _check(microbatch_sizes, repeats, warmup, threads, clock)
    cast = parse_dtype(dtype)
    work, dev = _where(model, device, cast)
    sample = move_sample(sample, dev, cast)
    gc.collect()
    timer = Clock(dev, clock)
    per_size = []
    loss_rows: list[tuple[int, int, int]] = []
    with _kept(work, threads):
        used_threads = torch.get_num_threads()
        work.train(train)
        graph = trace_model(work, sample, leaves=leaves, max_layers=max_layers, tracer=tracer)
        for b in sizes:
            args, kwargs = as_call(resize_sample(sample, b))
            env = graph.inputs_of(args, kwargs)
            per_size.append((layer_bytes(graph, env, split=split_backward),
                             time_graph_layers(graph, env, timer, warmup=warmup,
                                               repeat=repeats, split=split_backward)))
            if loss is not None:
                with torch.no_grad():
                    output = graph.run_layers(graph.inputs_of(args, kwargs),
                                              range(graph.num_layers))
                target = move_sample(resize_sample(loss[1], b), dev, None)  # the sample's rows
                loss_rows.append(loss_bytes(loss[0], output, target))
            if progress is not None:
                progress(f"b={b}")
    owned, tied = _params(graph)
    layers = []
    for layer in graph.layers:
        i = layer.index
        outputs = None if i == graph.num_layers - 1 else tuple(
            OutputValue(n, tuple(float(m.values[n]) for m, _ in per_size),
                        any(graph.needs_grad.get(n, ())))
            for n in layer.outputs)
        layers.append(LayerProfile(
            name=layer.name, type=_layer_type(work, layer.name), param_bytes=owned[i],
            fwd_ms=tuple(round(t.fwd_ms[i], 5) for _, t in per_size),
            bwd_ms=tuple(round(t.bwd_ms[i], 5) for _, t in per_size),
            in_bytes=tuple(float(m.in_bytes[i]) for m, _ in per_size),
            out_bytes=tuple(float(m.out_bytes[i]) for m, _ in per_size),
            saved_bytes=tuple(float(m.saved_bytes[i]) for m, _ in per_size),
            bwd_input_ms=_split(per_size, i, "bwd_input_ms"),
            bwd_weight_ms=_split(per_size, i, "bwd_weight_ms"),
            held_for_w_bytes=_held(per_size, i, 0), held_for_w_input_bytes=_held(per_size, i, 1),
            outputs=outputs))
    edges = tuple((u, v) for u, v, _ in graph.edges)
    reads = tuple(tuple(graph.layers[u].outputs.index(n) for n in names)
                  for u, _, names in graph.edges)
    model_dtype = next((p.dtype for p in work.parameters() if p.is_floating_point()),
                       torch.float32)
    harness = {"threads": used_threads, "warmup": warmup, "repeat": repeats, "train": train,
               "timing": "model", "flush_bytes": 0,
               "clock": clock if dev.type == "cpu" else "cuda-events",
               "overhead_fwd_ms": 0.0, "overhead_bwd_ms": 0.0,
               "pass_fwd_ms": [round(t.pass_fwd_ms, 5) for _, t in per_size],
               "pass_bwd_ms": [round(t.pass_bwd_ms, 5) for _, t in per_size],
               "split_backward": split_method("model") if split_backward else None}
    if split_backward:
        harness.update({key: [round(getattr(t, key), 5) for _, t in per_size]
                        for key in ("pass_bwd_input_ms", "pass_bwd_weight_ms")})
    trace = {"tracer": graph.capture.tracer, "leaves": leaf_names(leaves),
             "max_layers": max_layers, "layer_names": [layer.name for layer in graph.layers]}
    return Profile(
        model=name or type(model).__name__, device=device_info(dev),
        dtype=str(cast or model_dtype).removeprefix("torch."), microbatch_sizes=tuple(sizes),
        layers=tuple(layers), torch=torch.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        how=graph_how(graph, dev, clock, warmup, repeats, train, used_threads, split_backward),
        input=describe_sample(sample, input_info), edges=edges, edge_values=reads, tied=tied,
        loss=LossProfile(*(tuple(float(r[j]) for r in loss_rows) for j in range(3)))
        if loss_rows else None,
        extra={"trace": trace, "harness": harness})


def _split(per_size: Sequence[tuple[LayerBytes, GraphTimes]], i: int, key: str
           ) -> tuple[float, ...] | None:
    """Layer i's ``key`` (``bwd_input_ms`` or ``bwd_weight_ms``) per size; None if not measured."""
    got = [getattr(t, key) for _, t in per_size]
    return None if any(g is None for g in got) else tuple(round(g[i], 5) for g in got)


def _held(per_size: Sequence[tuple[LayerBytes, GraphTimes]], i: int, part: int
          ) -> tuple[float, ...] | None:
    """Layer i's ``held_for_w_bytes`` (part 0) or their input part (1) per size, if measured."""
    got = [m.held_for_w for m, _ in per_size]
    return None if any(g is None for g in got) else tuple(
        float(g[part][i]) for g in got if g is not None)


def profile_traced(model: nn.Module, sample: Any, sizes: Sequence[int], device: str | torch.device,
           *, timing: str, flush_bytes: int | None, keep_freed_memory: bool,
           **opts: Any) -> Profile:
    """``profile_graph`` with ``profile_model``'s options, for a model that is not an
    ``nn.Sequential``: its layers are timed only inside the whole model, with no cache flush.

        >>> from executor.workloads.graphmodels import build_graph_model
        >>> w = build_graph_model("tiny-unet", batch=1)
        >>> profile_traced(w.model, w.sample, [1], "cpu", timing="layer", flush_bytes=None,
        ...                keep_freed_memory=False, repeat=1)
        Traceback (most recent call last):
        ...
        ValueError: timing='layer', flush_bytes=None: the layers of a traced graph are timed only inside passes of the whole model; use timing='auto' or 'model' and no flush
    """
    if timing == "layer" or flush_bytes:
        raise ValueError(f"timing={timing!r}, flush_bytes={flush_bytes!r}: the layers of a "
                         f"traced graph are timed only inside passes of the whole model; use "
                         f"timing='auto' or 'model' and no flush")
    if keep_freed_memory:
        keep_memory()
    return profile_graph(model, sample, sizes, device=device, repeats=opts.pop("repeat"),
                         **opts)
