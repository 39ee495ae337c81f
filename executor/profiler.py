"""Profile an ``nn.Sequential`` layer by layer on a device: a ``gpipe-profile/1`` Profile.

    >>> from executor.models import build_model
    >>> w = build_model("gpt-tiny", batch=2)
    >>> prof = profile_model(w.model, w.sample, [1, 2], "cpu", warmup=0, repeat=1, threads=1)
    >>> prof.num_layers, prof.microbatch_sizes, prof.layers[0].type
    (6, (1, 2), 'Embed')

Each layer is measured on a copy of it moved to the device, with inputs from a real forward
pass of the layers before it, so the user's model is never changed (parameters, gradients,
buffers, ``training`` flags and device); the global random state is restored afterwards.
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from partitioner.profile import DeviceInfo, LayerProfile, Profile

from .allocator import keep_freed_memory
from .measure import (
    CLOCKS,
    Batch,
    Measurement,
    as_tensors,
    harness_overhead_ms,
    measure,
    prepare_batch,
    slice_batch,
)

__all__ = ["DTYPES", "cpu_l2_bytes", "default_flush_bytes", "device_info", "parse_device",
           "parse_dtype", "profile_model",
           "time_whole_model"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_device(device: str | torch.device) -> torch.device:
    """A torch.device that exists here; ValueError for CUDA on a machine without it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device name ({exc}); use cpu or "
                         f"cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the profiler supports cpu and cuda[:N]")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (torch "
                             f"{torch.__version__}, {torch.cuda.device_count()} GPUs); "
                             f"profile with --device cpu or run on a machine with a GPU")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) here")
        dev = torch.device("cuda", index)
    return dev


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` keeps the model's own dtype; otherwise one of ``DTYPES`` (name or torch dtype)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def device_info(device: torch.device) -> DeviceInfo:
    """Name, kind and memory of a device; for the CPU, the machine's RAM."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo(props.name, "cuda", int(props.total_memory))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        name)
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceInfo(f"{name} ({os.cpu_count()} cores)", "cpu", int(memory))


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


def cpu_l2_bytes() -> int:
    """One core's L2 cache in bytes (sysconf, else sysfs; 1 MiB when neither says)."""
    try:
        size = os.sysconf("SC_LEVEL2_CACHE_SIZE")
        if size > 0:
            return int(size)
    except (ValueError, OSError):
        pass
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            text = f.read().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        return 1 << 20


def default_flush_bytes(device: torch.device, model_bytes: int) -> int:
    """The cache flush the profiler uses unless told: on the CPU, for a model whose weights
    (``model_bytes``) do not fit one core's L2, twice that L2, so a layer's weights and saved
    tensors come from beyond L2 as inside the whole model, while its input (made after the
    flush) is hot as if just made by the layer before. None for a model that fits (its
    weights stay in L2 from layer to layer) and none on CUDA.

        >>> l2, cpu = cpu_l2_bytes(), torch.device("cpu")
        >>> default_flush_bytes(cpu, 4 * l2) == 2 * l2, default_flush_bytes(cpu, l2 // 2)
        (True, 0)
        >>> default_flush_bytes(torch.device("cuda"), 4 * l2)
        0
    """
    if device.type != "cpu":
        return 0
    l2 = cpu_l2_bytes()
    return 2 * l2 if model_bytes > l2 else 0


def _check_args(model: object, sample: object, sizes: Sequence[int], warmup: int, repeat: int,
                threads: int | None, clock: str) -> tuple[nn.Sequential, Batch, list[int]]:
    """Validate at the boundary; collect every problem before raising."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"the model is a {type(model).__name__}; the profiler needs an "
                        f"nn.Sequential whose children are the pipeline's layers "
                        f"(wrap or flatten the model into one)")
    tensors = as_tensors(sample, "the sample batch")
    problems = []
    if len(model) == 0:
        problems.append("the nn.Sequential has no layers")
    rows = {t.shape[0] if t.dim() else 0 for t in tensors}
    if len(rows) != 1 or 0 in rows:
        problems.append(f"the sample's tensors have first dimensions {sorted(rows)}; give a "
                        f"batch whose tensors all share one first (batch) dimension >= 1")
    batch = max(rows)
    clean = sorted({int(b) for b in sizes if isinstance(b, int) and not isinstance(b, bool)})
    bad = [b for b in sizes if not (isinstance(b, int) and not isinstance(b, bool) and b >= 1)]
    if not sizes or bad:
        problems.append(f"micro-batch sizes {list(sizes)!r} must be whole numbers >= 1")
    too_big = [b for b in clean if b > batch]
    if too_big:
        problems.append(f"micro-batch sizes {too_big} are larger than the sample batch of "
                        f"{batch}; give a sample of at least {max(too_big)} rows or drop them")
    if warmup < 0 or repeat < 1:
        problems.append(f"warmup={warmup} must be >= 0 and repeat={repeat} >= 1")
    if threads is not None and threads < 1:
        problems.append(f"threads={threads} must be >= 1 (or None for torch's default)")
    if clock not in CLOCKS:
        problems.append(f"clock={clock!r} is not one of {', '.join(CLOCKS)}")
    elif clock == "thread" and (threads or torch.get_num_threads()) != 1:
        problems.append("clock='thread' counts only the calling thread's CPU time, so it needs "
                        "threads=1; pass threads=1 or use clock='wall'")
    if problems:
        raise ValueError("cannot profile: " + "; ".join(problems))
    return model, (tensors[0] if isinstance(sample, torch.Tensor) else tensors), clean


def _prepare(model: object, sample: object, microbatch_sizes: Sequence[int],
             device: str | torch.device, dtype: str | torch.dtype | None, warmup: int,
             repeat: int, threads: int | None, clock: str, flush_bytes: int | None
             ) -> tuple[nn.Sequential, Batch, list[int], torch.device, torch.dtype | None, int]:
    """What profiling and timing the whole model share: the checked arguments, the device and
    dtype, the flush to use, and the allocator the executor runs with (executor.allocator)."""
    seq, batch, sizes = _check_args(model, sample, microbatch_sizes, warmup, repeat, threads,
                                    clock)
    dev, cast = parse_device(device), parse_dtype(dtype)
    keep_freed_memory()
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


def profile_model(
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
    correct_overhead: bool = True,
    name: str = "model",
    input_info: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Profile:
    """Measure every child of ``model`` at each micro-batch size (the first rows of ``sample``).

    ``dtype`` casts floating parameters and inputs (None keeps them); ``threads`` sets torch's
    intra-op threads while profiling (a pipeline rank may run with fewer than the machine
    has); ``clock`` on the CPU is ``"wall"`` (perf_counter) or ``"thread"`` (the thread's CPU
    time: immune to other processes on a shared machine, needs threads=1); ``flush_bytes``
    evicts the caches before each timed forward and backward (0: off; None: on the CPU twice
    one core's L2 when the model's weights do not fit in it, see ``default_flush_bytes``;
    see ``measure.measure``); ``train``
    profiles in training mode (dropout on, BatchNorm on batch statistics);
    ``correct_overhead`` subtracts the per-call harness cost measured on no-op layers
    (see ``measure.harness_overhead_ms``); ``progress(layer_name)`` is called after each layer.
    """
    model, sample, sizes, dev, cast, flush_bytes = _prepare(
        model, sample, microbatch_sizes, device, dtype, warmup, repeat, threads, clock,
        flush_bytes)
    per_size: list[list[Measurement]] = []
    gc.collect()
    with _preserved_state(dev, threads):
        used_threads = torch.get_num_threads()
        overhead = harness_overhead_ms(dev, clock=clock) if correct_overhead else (0.0, 0.0)
        xs = {b: prepare_batch(slice_batch(sample, b), dev, cast) for b in sizes}
        layers = list(model.named_children())
        param_bytes = []
        for i, (layer_name, layer) in enumerate(layers):
            twin = _layer_copy(layer, dev, cast, train)
            param_bytes.append(_param_bytes(twin))
            row = [_measure_layer(twin, xs[b], dev, i, layer_name, b, warmup=warmup,
                                  repeat=repeat, clock=clock, flush_bytes=flush_bytes)
                   for b in sizes]
            per_size.append(row)
            xs = {b: m.output for b, m in zip(sizes, row, strict=True)}
            del twin
            if progress is not None:
                progress(layer_name)
    fwd_over, bwd_over = overhead
    profiled = []
    for (layer_name, layer), row, pbytes in zip(layers, per_size, param_bytes, strict=True):
        profiled.append(LayerProfile(
            name=layer_name,
            type=type(layer).__name__,
            param_bytes=pbytes,
            fwd_ms=tuple(round(max(0.0, m.fwd_ms - fwd_over), 5) for m in row),
            bwd_ms=tuple(round(max(0.0, m.bwd_ms - bwd_over), 5) if m.has_backward else 0.0
                         for m in row),
            in_bytes=tuple(float(m.in_bytes) for m in row),
            out_bytes=tuple(float(m.out_bytes) for m in row),
            saved_bytes=tuple(float(m.saved_bytes) for m in row),
            peak_bytes=(tuple(float(m.peak_bytes or 0) for m in row)
                        if dev.type == "cuda" else None),
        ))
    timer = {"wall": "time.perf_counter", "thread": "time.thread_time, the thread's CPU time"}
    parts = [
        f"Each layer timed alone on a copy "
        f"({'CUDA events, synchronised' if dev.type == 'cuda' else timer[clock]}; median of "
        f"{repeat} after {warmup} warm-up), input from a real forward pass of the layers "
        f"before it, {'training' if train else 'eval'} mode, {used_threads} intra-op "
        f"thread(s)",
        "backward into .grad of the floating inputs and the parameters, the parameters' "
        "gradients accumulating as in a training step",
        (f"per-call harness overhead measured on no-op layers (fwd {fwd_over:.4f} ms, bwd "
         f"{bwd_over:.4f} ms) and subtracted" if correct_overhead
         else "per-call harness overhead not corrected"),
        "saved_bytes = unique storages autograd saves for backward, parameters excluded",
    ]
    if flush_bytes:
        parts.append(f"caches flushed with {flush_bytes} bytes before each timed region")
    if dev.type == "cuda":
        parts.append("peak_bytes = allocator peak of one forward+backward above what was "
                     "allocated before it")
    how = "; ".join(parts) + "."
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
        extra={"harness": {"threads": used_threads, "warmup": warmup, "repeat": repeat,
                           "train": train, "flush_bytes": flush_bytes,
                           "clock": clock if dev.type == "cpu" else "cuda-events",
                           "overhead_fwd_ms": round(fwd_over, 6),
                           "overhead_bwd_ms": round(bwd_over, 6)}},
    )


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
) -> list[tuple[float, float]]:
    """(fwd_ms, bwd_ms) of the whole model as one module, per micro-batch size, with the same
    harness as the layers (no overhead correction): the reference a profile's sum must match.
    """
    model, sample, sizes, dev, cast, flush_bytes = _prepare(
        model, sample, microbatch_sizes, device, dtype, warmup, repeat, threads, clock,
        flush_bytes)
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
