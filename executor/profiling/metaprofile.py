"""A ``gpipe-profile/1`` made without the device: bytes counted on meta, times from a device model.

    >>> from executor.workloads.models import build_model
    >>> from partitioner.formats.device import load_device_model
    >>> w = build_model("gpt-tiny", batch=2, device="meta")
    >>> prof = meta_profile(w.model, w.sample, [1, 2], load_device_model("h200"), "gpt-tiny",
    ...                     loss=(w.loss_fn, w.target))
    >>> prof.device.name, prof.dtype, prof.how.startswith("Made without the device")
    ('NVIDIA H200', 'bfloat16', True)

For a device one does not have, or a model too large for any machine: every layer's forward
and backward run on the meta device (``executor.profiling.meta.count_layers``: no memory, no
compute), which gives the bytes exactly as the profiler counts them and each pass's kernels
with their FLOPs and bytes moved; ``partitioner.cost.worktime`` turns those into the times the
layer would take alone on the target (the device model's peak rates, fitted efficiencies and
launch costs), as the profiler would have timed it there. The profile says so in ``how``, so
the planner applies the device model's in-step rule on top (``--device-model auto``), as for
a profile measured alone on the device.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from executor.profiling.meta import MetaCounts, Work, count_layers
from executor.runtime.batch import Batch
from partitioner.cost.sizes import FloatArray
from partitioner.cost.worktime import PassWork, alone_ms, peak_tflops
from partitioner.formats.device import DeviceModel, device_model_to_dict
from partitioner.formats.profile import DeviceInfo, LayerProfile, Profile

__all__ = ["meta_profile", "pass_work", "times_from_counts"]

_PASSES = ("fwd", "bwd", "bwd_input", "bwd_weight")


def pass_work(works: Sequence[Work], backward: Sequence[bool]) -> PassWork:
    """``worktime.PassWork`` of counted passes (``metaops.Work``), each a backward or not."""
    return PassWork.of([w.ops for w in works], [w.kernels for w in works], backward,
                       [w.views for w in works])


def times_from_counts(counts: MetaCounts, target: DeviceModel) -> dict[str, FloatArray]:
    """Per pass (``fwd``, ``bwd``, ``bwd_input``, ``bwd_weight``), every layer's time alone
    on ``target`` at each size: an array (layers, sizes)."""
    peak_tflops(target, counts.dtype)  # a clear error before any work
    works = [getattr(lay, key)[j] for key in _PASSES for lay in counts.layers
             for j in range(len(counts.microbatch_sizes))]
    backward = [key != "fwd" for key in _PASSES for _ in counts.layers
                for _ in counts.microbatch_sizes]
    ms = alone_ms(pass_work(works, backward), target, counts.dtype)
    shape = (len(_PASSES), len(counts.layers), len(counts.microbatch_sizes))
    table = ms.reshape(shape)
    return {key: table[k] for k, key in enumerate(_PASSES)}


def meta_profile(model: nn.Sequential, sample: Batch, microbatch_sizes: Sequence[int],
                 target: DeviceModel, model_name: str, *, dtype: str = "bfloat16",
                 loss: tuple[Callable[[Any, Any], torch.Tensor], Any] | None = None,
                 input_info: dict[str, Any] | None = None) -> Profile:
    """The profile ``profile_model`` would write for ``model`` on ``target`` (see the module's
    docstring); ``model`` and ``sample`` may be on the meta device (``build_model(...,
    device="meta")``), and are never changed."""
    counts = count_layers(model, sample, microbatch_sizes, dtype, loss=loss)
    times = times_from_counts(counts, target)

    def row(key: str, i: int) -> tuple[float, ...]:
        return tuple(float(x) for x in times[key][i])

    layers = tuple(LayerProfile(
        lay.name, lay.type, lay.param_bytes, row("fwd", i), row("bwd", i), lay.in_bytes,
        lay.out_bytes, lay.saved_bytes, bwd_input_ms=row("bwd_input", i),
        bwd_weight_ms=row("bwd_weight", i), saved_input_bytes=lay.saved_input_bytes,
        saved_output_bytes=lay.saved_output_bytes, held_for_w_bytes=lay.held_for_w_bytes,
        held_for_w_input_bytes=lay.held_for_w_input_bytes)
        for i, lay in enumerate(counts.layers))
    figures = {k: v for k, v in device_model_to_dict(target, fit=False).items()
               if k not in ("format", "how", "device_names", "kind", "source")}
    how = (f"Made without the device: every layer's forward and backward run on the meta "
           f"device in {counts.dtype} (executor.profiling.meta: bytes counted as the "
           f"profiler counts them, exactly; each kernel's FLOPs and bytes moved, attention "
           f"as a {counts.attention.upper()} runs it); times are what the layer would take "
           f"alone on {target.name} ({target.source} device model, "
           f"partitioner.cost.worktime: a roofline per kernel, launch costs per layer and "
           f"kernel): {figures}")
    name = target.device_names[0] if target.device_names else target.name
    return Profile(model_name, DeviceInfo(name, target.kind, target.memory_bytes),
                   counts.dtype, tuple(counts.microbatch_sizes), layers,
                   torch=torch.__version__,
                   created=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   how=how, input=input_info, loss=counts.loss)
