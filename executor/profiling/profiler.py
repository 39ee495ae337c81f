"""Profile a model layer by layer on a device: a ``gpipe-profile/1`` Profile.

    >>> from executor.workloads.models import build_model
    >>> w = build_model("gpt-tiny", batch=2)
    >>> prof = profile_model(w.model, w.sample, [1, 2], "cpu", warmup=0, repeat=1, threads=1)
    >>> prof.num_layers, prof.microbatch_sizes, prof.layers[0].type
    (6, (1, 2), 'Embed')

Each layer's memory is measured on a copy of it moved to the device, with inputs from a real
forward pass of the layers before it; its time inside passes of a copy of the whole model
where that fits the device (``executor.profiling.inmodel``), else alone with the per-call overhead
corrected. With ``split_backward`` (the default) further passes, the same way, give each layer's
split backward for zero-bubble schedules: ``bwd_input_ms`` (I) and ``bwd_weight_ms`` (W, the
weight gradients ``executor.runtime.splitgrad`` defers; 0 where it defers none). Any other
``nn.Module`` is traced into a graph of layers and profiled by
``executor.profiling.graph.profile_graph``. The user's model is never changed (parameters, gradients,
buffers, ``training`` flags and device); the global random state is restored afterwards.
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
from executor.profiling.graph import profile_traced
from executor.profiling.how import chain_how, split_method
from executor.profiling.inmodel import time_layers_in_model, time_split_in_model, whole_model_bytes
from executor.profiling.measure import (
    Measurement,
    as_tensors,
    chain_problems,
    harness_overhead_ms,
    loss_bytes,
    measure,
    prepare_batch,
    slice_batch,
    timing_problems,
)
from executor.runtime.allocator import keep_freed_memory as keep_memory
from executor.runtime.batch import Batch
from executor.runtime.devices import (
    default_flush_bytes,
    device_info,
    free_bytes,
    parse_dtype,
    resolve_device,
)
from partitioner.formats.profile import LayerProfile, Profile
from partitioner.formats.profile_loss import LossProfile

__all__ = ["TIMINGS", "profile_model", "time_whole_model"]


@contextmanager
def _preserved_state(device: torch.device, threads: int | None) -> Iterator[None]:
    """Restore the RNG states (CPU, and CUDA where used), thread count and grad mode; on a GPU,
    make ``device`` the current one so events and streams belong to it."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = (torch.cuda.get_rng_state_all()
                if device.type == "cuda" or torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
                else None)
    old_threads = torch.get_num_threads()
    grad_enabled = torch.is_grad_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield
    finally:
        torch.set_num_threads(old_threads)
        torch.set_grad_enabled(grad_enabled)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _check_args(model: object, sample: object, sizes: Sequence[int], warmup: int, repeat: int,
                threads: int | None, clock: str) -> tuple[nn.Sequential, Batch, list[int]]:
    """Validate at the boundary; collect every problem before raising."""
    model, tensors, problems, batch = chain_problems(model, sample, "the profiler")
    clean = sorted({int(b) for b in sizes if isinstance(b, int) and not isinstance(b, bool)})
    bad = [b for b in sizes if not (isinstance(b, int) and not isinstance(b, bool) and b >= 1)]
    if not sizes or bad:
        problems.append(f"micro-batch sizes {list(sizes)!r} must be whole numbers >= 1")
    too_big = [b for b in clean if b > batch]
    if too_big:
        problems.append(f"micro-batch sizes {too_big} are larger than the sample batch of "
                        f"{batch}; give a sample of at least {max(too_big)} rows or drop them")
    problems += timing_problems(warmup, repeat, threads, clock)
    if problems:
        raise ValueError("cannot profile: " + "; ".join(problems))
    return model, (tensors[0] if isinstance(sample, torch.Tensor) else tensors), clean


def _prepare(model: object, sample: object, microbatch_sizes: Sequence[int],
             device: str | torch.device, dtype: str | torch.dtype | None, warmup: int,
             repeat: int, threads: int | None, clock: str, flush_bytes: int | None,
             keep_freed_memory: bool
             ) -> tuple[nn.Sequential, Batch, list[int], torch.device, torch.dtype | None, int]:
    """What profiling and timing the whole model share: the checked arguments, the device and
    dtype, the flush to use, and, if asked, the allocator setting the runners take
    (``executor.runtime.allocator``)."""
    seq, batch, sizes = _check_args(model, sample, microbatch_sizes, warmup, repeat, threads,
                                    clock)
    dev, cast = resolve_device(device), parse_dtype(dtype)
    if keep_freed_memory:
        keep_memory()
    if flush_bytes is None:
        flush_bytes = default_flush_bytes(dev, _param_bytes(seq))
    return seq, batch, sizes, dev, cast, flush_bytes


def _describe_input(sample: Batch, info: Mapping[str, Any] | None) -> dict[str, Any]:
    tensors = as_tensors(sample, "sample")
    shapes = [list(t.shape[1:]) for t in tensors]
    dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
    out: dict[str, Any] = dict(info or {})
    if isinstance(sample, torch.Tensor):
        out.update(sample_shape=shapes[0], sample_dtype=dtypes[0])
    else:
        out.update(sample_shapes=shapes, sample_dtypes=dtypes)
    return out


def _layer_copy(layer: nn.Module, device: torch.device, dtype: torch.dtype | None,
                train: bool) -> nn.Module:
    """A private copy of ``layer`` on the device, in the profile's dtype and mode."""
    twin = copy.deepcopy(layer)
    for p in twin.parameters():
        p.grad = None
    if dtype is not None:
        twin.to(device=device, dtype=dtype)
    else:
        twin.to(device=device)
    return twin.train(train)


def _measure_layer(layer: nn.Module, x: Batch, device: torch.device, index: int, name: str,
                   b: int, **opts: Any) -> Measurement:
    """``measure`` one layer; a failure inside it names the layer and the micro-batch size."""
    try:
        return measure(layer, x, device, input_grad=index > 0, name=name, **opts)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"layer {name} ({type(layer).__name__}) failed at micro-batch size "
                         f"{b}: {exc}") from exc


def _param_bytes(module: nn.Module) -> int:
    unique = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in unique)


#: How layers are timed: "model" inside passes of the whole model (executor.profiling.inmodel), "layer"
#: each alone on its own copy (for a model that does not fit the device), "auto" the first
#: where the whole model fits in half the device's free memory, else the second.
TIMINGS = ("auto", "model", "layer")


def profile_model(
    model: nn.Module,
    sample: Any,
    microbatch_sizes: Sequence[int],
    device: str | torch.device = "cpu",
    *,
    dtype: str | torch.dtype | None = None,
    warmup: int = 3,
    repeat: int = 10,
    threads: int | None = None,
    clock: str = "wall",
    timing: str = "auto",
    flush_bytes: int | None = None,
    train: bool = True,
    correct_overhead: bool = True,
    keep_freed_memory: bool = False,
    name: str = "model",
    input_info: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    leaves: Sequence[Leaf] = (),
    max_layers: int | None = None,
    split_backward: bool = True,
    loss: tuple[Callable[[Any, Any], torch.Tensor], Any] | None = None,
) -> Profile:
    """Measure every child of ``model`` at each micro-batch size (the first rows of ``sample``);
    a model that is not an ``nn.Sequential`` goes to ``graph.profile_traced`` (``leaves`` and ``max_layers``
    say how to trace it).

    ``dtype`` casts floating parameters and inputs (None keeps them); ``threads`` sets torch's
    intra-op threads while profiling (a pipeline rank may run with fewer than the machine
    has); ``clock`` on the CPU is ``"wall"`` (perf_counter) or ``"thread"`` (the thread's CPU
    time: immune to other processes on a shared machine, needs threads=1); ``timing``: one of
    ``TIMINGS``; ``train`` profiles in training mode (dropout on, BatchNorm on batch
    statistics); ``progress(name)`` is called after each layer's memory pass and then, when
    the layers are timed inside the model, after each size's passes. Memory figures always
    come from each layer alone. For layers timed alone: ``flush_bytes`` evicts the caches
    before each timed forward and backward (0: off; None: on the CPU twice one core's L2 when
    the model's weights do not fit in it, see ``default_flush_bytes`` and ``measure.measure``);
    ``correct_overhead`` subtracts the per-call harness cost measured on no-op layers
    (see ``measure.harness_overhead_ms``). ``keep_freed_memory`` first sets this process's
    allocator as the runners do with the same option (``executor.runtime.allocator``): profile
    under the allocator the pipeline will run with. ``split_backward`` also measures each
    layer's I and W (``bwd_input_ms``, ``bwd_weight_ms``) in as many further passes (or
    repetitions, for layers timed alone); ``bwd_ms`` stays the fused backward either way.
    ``loss=(loss_fn, target)`` (a target of at least the largest size's rows) also measures
    what the loss keeps for backward on the last stage at each size (the profile's ``loss``).
    """
    if timing not in TIMINGS:
        raise ValueError(f"timing={timing!r} is not one of {', '.join(TIMINGS)}")
    if loss is not None:
        rows = min(t.shape[0] if t.dim() else 0 for t in as_tensors(loss[1], "the loss target"))
        if rows < max(microbatch_sizes):
            raise ValueError(f"loss= has a target of {rows} rows, but the largest micro-batch "
                             f"size is {max(microbatch_sizes)}; give a target with at least "
                             f"that many rows (one per sample)")
    if not isinstance(model, nn.Sequential):
        return profile_traced(
            model, sample, microbatch_sizes, device, dtype=dtype, warmup=warmup, repeat=repeat,
            threads=threads, clock=clock, timing=timing, flush_bytes=flush_bytes, train=train,
            keep_freed_memory=keep_freed_memory, name=name, input_info=input_info,
            progress=progress, leaves=leaves, max_layers=max_layers,
            split_backward=split_backward, loss=loss)
    if leaves or max_layers is not None:
        raise ValueError(f"leaves={list(leaves)!r} and max_layers={max_layers!r} say how to "
                         f"trace a graph; an nn.Sequential is profiled child by child: drop "
                         f"them, or pass a model that is not an nn.Sequential")
    model, sample, sizes, dev, cast, flush_bytes = _prepare(
        model, sample, microbatch_sizes, device, dtype, warmup, repeat, threads, clock,
        flush_bytes, keep_freed_memory)
    gc.collect()
    reps = {"warmup": warmup, "repeat": repeat, "clock": clock}
    in_model: list[list[tuple[float, float, bool]]] | None = None
    split: list[list[tuple[float, float]]] | None = None  # per size, per layer: (I, W) ms
    with _preserved_state(dev, threads):
        used_threads = torch.get_num_threads()
        alone = timing == "layer"
        alone_reps = {**reps, "split": split_backward}
        per_size, param_bytes = _layer_pass(
            model, sample, sizes, dev, cast, train, progress,
            alone_reps if alone else {"warmup": 0, "repeat": 1, "clock": clock,
                                      "held_for_w": split_backward},
            flush_bytes if alone else 0)
        if not alone:
            timed = _try_in_model(model, sample, sizes, dev, cast, train, reps, timing,
                                  whole_model_bytes(per_size, param_bytes), progress,
                                  split_backward)
            if timed is None:  # "auto" and the whole model does not fit: time them alone
                per_size, _ = _layer_pass(model, sample, sizes, dev, cast, train, None,
                                          alone_reps, flush_bytes)
            else:
                in_model, split = timed
        used = "layer" if in_model is None else "model"
        overhead = (harness_overhead_ms(dev, clock=clock) if used == "layer" and
                    correct_overhead else (0.0, 0.0))
    fwd_over, bwd_over = overhead
    profiled = []
    layers = list(model.named_children())
    for i, ((layer_name, layer), row, pbytes) in enumerate(
            zip(layers, per_size, param_bytes, strict=True)):
        i_ms: tuple[float, ...] | None = None
        w_ms: tuple[float, ...] | None = None
        if in_model is not None:
            fwd = tuple(round(t[i][0], 5) for t in in_model)
            bwd = tuple(round(t[i][1], 5) if t[i][2] else 0.0 for t in in_model)
            if split is not None:
                i_ms = tuple(round(t[i][0], 5) for t in split)
                w_ms = tuple(round(t[i][1], 5) for t in split)
        else:
            fwd = tuple(round(max(0.0, m.fwd_ms - fwd_over), 5) for m in row)
            bwd = tuple(round(max(0.0, m.bwd_ms - bwd_over), 5) if m.has_backward else 0.0
                        for m in row)
            if split_backward:  # I pays the backward-call overhead as B does; W as in the model
                i_ms = tuple(round(max(0.0, (m.bwd_input_ms or 0.0) - bwd_over), 5)
                             if m.has_backward else 0.0 for m in row)
                w_ms = tuple(round(m.bwd_weight_ms or 0.0, 5) for m in row)
        profiled.append(LayerProfile(
            name=layer_name,
            type=type(layer).__name__,
            param_bytes=pbytes,
            fwd_ms=fwd,
            bwd_ms=bwd,
            in_bytes=tuple(float(m.in_bytes) for m in row),
            out_bytes=tuple(float(m.out_bytes) for m in row),
            saved_bytes=tuple(float(m.saved_bytes) for m in row),
            saved_input_bytes=tuple(float(m.saved_input_bytes) for m in row),
            saved_output_bytes=tuple(float(m.saved_output_bytes) for m in row),
            held_for_w_bytes=_column(row, "held_for_w_bytes"),
            held_for_w_input_bytes=_column(row, "held_for_w_input_bytes"),
            peak_bytes=(tuple(float(m.peak_bytes or 0) for m in row)
                        if dev.type == "cuda" else None),
            bwd_input_ms=i_ms, bwd_weight_ms=w_ms,
        ))
    loss_rows = [] if loss is None else [
        loss_bytes(loss[0], m.output, prepare_batch(slice_batch(loss[1], b), dev, cast))
        for m, b in zip(per_size[-1], sizes, strict=True)]
    how = chain_how(dev, used, clock, warmup, repeat, train, used_threads,
                    overhead if correct_overhead else None, flush_bytes if used == "layer" else 0,
                    split_backward)
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                       torch.float32)
    return Profile(
        model=name,
        device=device_info(dev),
        dtype=str(cast or model_dtype).removeprefix("torch."),
        microbatch_sizes=tuple(sizes),
        layers=tuple(profiled),
        torch=torch.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        how=how,
        input=_describe_input(sample, input_info),
        loss=LossProfile(*(tuple(float(r[j]) for r in loss_rows) for j in range(3)))
        if loss_rows else None,
        extra={"harness": {"threads": used_threads, "warmup": warmup, "repeat": repeat,
                           "train": train, "timing": used,
                           "flush_bytes": flush_bytes if used == "layer" else 0,
                           "clock": clock if dev.type == "cpu" else "cuda-events",
                           "overhead_fwd_ms": round(fwd_over, 6),
                           "overhead_bwd_ms": round(bwd_over, 6),
                           "split_backward": split_method(used) if split_backward else None}},
    )


def _column(row: Sequence[Measurement], key: str) -> tuple[float, ...] | None:
    """One optional figure of a layer per size, or None where it was not measured."""
    values = [getattr(m, key) for m in row]
    return None if any(v is None for v in values) else tuple(float(v) for v in values)


def _layer_pass(model: nn.Sequential, sample: Batch, sizes: list[int], dev: torch.device,
                cast: torch.dtype | None, train: bool,
                progress: Callable[[str], None] | None, reps: Mapping[str, Any],
                flush_bytes: int) -> tuple[list[list[Measurement]], list[int]]:
    """Each layer alone on its own copy at every size, its input the output of the layer
    before: per layer, one Measurement per size, and its parameter bytes."""
    xs = {b: prepare_batch(slice_batch(sample, b), dev, cast) for b in sizes}
    per_size: list[list[Measurement]] = []
    param_bytes = []
    for i, (layer_name, layer) in enumerate(model.named_children()):
        twin = _layer_copy(layer, dev, cast, train)
        param_bytes.append(_param_bytes(twin))
        row = [_measure_layer(twin, xs[b], dev, i, layer_name, b, flush_bytes=flush_bytes,
                              **reps) for b in sizes]
        per_size.append(row)
        xs = {b: m.output for b, m in zip(sizes, row, strict=True)}
        del twin
        if progress is not None:
            progress(layer_name)
    return per_size, param_bytes


def _try_in_model(model: nn.Sequential, sample: Batch, sizes: list[int], dev: torch.device,
                  cast: torch.dtype | None, train: bool, reps: Mapping[str, Any], timing: str,
                  need: int, progress: Callable[[str], None] | None, split: bool
                  ) -> tuple[list[list[tuple[float, float, bool]]],
                             list[list[tuple[float, float]]] | None] | None:
    """Per size, the layers' times inside the whole model and, if ``split``, their (I, W) from
    further passes; None where ``timing`` is "auto" and the whole model does not fit (``need``
    bytes over half the device's free memory, or out of memory on the way)."""
    free = free_bytes(dev)
    if timing == "auto" and need > free // 2:
        return None
    try:
        twin = nn.Sequential(*_layer_copy(model, dev, cast, train).children())
        out, out_split = [], []
        for b in sizes:
            x = prepare_batch(slice_batch(sample, b), dev, cast)
            out.append(time_layers_in_model(twin, x, dev, **reps))
            if split:  # after the fused passes, which are timed exactly as without it
                out_split.append(time_split_in_model(twin, x, dev, **reps))
            if progress is not None:
                progress(f"the whole model at b={b}")
    except torch.cuda.OutOfMemoryError as exc:
        if timing == "auto":
            return None
        raise ValueError(f"the whole model does not fit on {dev} to time its layers in place "
                         f"(needs about {need} bytes, {free} free: {exc}); use timing='layer' "
                         f"(--timing layer) to time each layer alone") from None
    return out, out_split if split else None


def time_whole_model(
    model: nn.Sequential,
    sample: Batch,
    microbatch_sizes: Sequence[int],
    device: str | torch.device = "cpu",
    *,
    dtype: str | torch.dtype | None = None,
    warmup: int = 3,
    repeat: int = 10,
    threads: int | None = None,
    clock: str = "wall",
    flush_bytes: int | None = None,
    train: bool = True,
    keep_freed_memory: bool = False,
) -> list[tuple[float, float]]:
    """(fwd_ms, bwd_ms) of the whole model as one module, per micro-batch size, with the same
    harness as the layers (no overhead correction): the reference a profile's sum must match.
    """
    model, sample, sizes, dev, cast, flush_bytes = _prepare(
        model, sample, microbatch_sizes, device, dtype, warmup, repeat, threads, clock,
        flush_bytes, keep_freed_memory)
    gc.collect()
    with _preserved_state(dev, threads):
        twin = _layer_copy(model, dev, cast, train)
        out = []
        for b in sizes:
            m = measure(twin, prepare_batch(slice_batch(sample, b), dev, cast), dev,
                        input_grad=False, warmup=warmup, repeat=repeat, clock=clock,
                        flush_bytes=flush_bytes, name="model")
            out.append((m.fwd_ms, m.bwd_ms))
    return out
