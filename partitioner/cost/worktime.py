"""A layer's time alone on a device it never ran on: from its work and the device's figures.

    >>> from partitioner.formats.device import DeviceModel
    >>> dm = DeviceModel("toy", peak_tflops=(("bfloat16", 100.0),), memory_gbps=1000.0,
    ...                  half_work_gflop=1.0, layer_launch_ms=0.01, kernel_launch_ms=0.005)
    >>> ms = alone_ms(np.array([1e9, 1e12]), np.array([1e6, 1e9]), np.array([4, 4]), dm,
    ...               "bfloat16")
    >>> [round(float(x), 4) for x in ms]      # launch-bound; then compute at ~full rate + memory
    [0.03, 11.01]

For one pass of one layer (its forward, or its backward) with ``flops`` FLOPs, ``moved``
bytes read and written by its kernels and ``kernels`` kernels (``executor.profiling.meta``
counts them on the meta device), timed alone as a profiler times it:

    time = max(launch, compute + memory)
    launch = layer_launch_ms + kernels x kernel_launch_ms
    compute = flops / (peak x flops / (flops + half_work)),   i.e. (flops + half_work) / peak
    memory = moved / (memory_gbps x memory_efficiency)

so small work runs at a fraction of the peak rate (half of it at ``half_work_gflop``), the
matrix products and the element-wise kernels of a layer run one after the other (their times
add), and a layer too small to fill the device costs its launches. The fitted figures come
from measured profiles of the same device (``fit_work_figures``), the peaks from the
vendor or a measurement (``formats.device``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from partitioner.cost.fit import nelder_mead
from partitioner.cost.sizes import FloatArray
from partitioner.formats.device import DeviceModel

__all__ = ["WORK_BOUNDS", "alone_ms", "fit_work_figures", "peak_tflops"]

#: The range each fitted work figure is searched in.
WORK_BOUNDS = {"half_work_gflop": (0.0, 100.0), "memory_efficiency": (0.05, 1.0),
               "layer_launch_ms": (0.0, 1.0), "kernel_launch_ms": (0.0, 0.1)}


def peak_tflops(dm: DeviceModel, dtype: str) -> float:
    """The device's peak rate for ``dtype``; a clear error where the model has none."""
    peaks = dict(dm.peak_tflops)
    if dtype not in peaks:
        raise ValueError(f"device model {dm.name!r} has no peak_tflops for {dtype!r} (it has: "
                         f"{', '.join(peaks) or 'none'}); add the figure to its file, or "
                         f"profile in a dtype it has")
    if not peaks[dtype] > 0 or not dm.memory_gbps > 0:
        raise ValueError(f"device model {dm.name!r}: peak_tflops[{dtype!r}]={peaks[dtype]!r} "
                         f"and memory_gbps={dm.memory_gbps!r} must both be > 0 to time work")
    return peaks[dtype]


def alone_ms(flops: FloatArray, moved: FloatArray, kernels: FloatArray, dm: DeviceModel,
             dtype: str) -> FloatArray:
    """Each pass's time alone (see the module's docstring), elementwise over the arrays."""
    peak = peak_tflops(dm, dtype) * 1e9  # FLOPs per ms
    compute = np.where(flops > 0, (flops + dm.half_work_gflop * 1e9) / peak, 0.0)
    memory = moved / (dm.memory_gbps * 1e6 * dm.memory_efficiency)
    launch = np.where(kernels > 0, dm.layer_launch_ms + kernels * dm.kernel_launch_ms, 0.0)
    out: FloatArray = np.maximum(launch, compute + memory)
    return out


def fit_work_figures(samples: Sequence[tuple[float, float, float, float]], dm: DeviceModel,
                     dtype: str, evals: int = 600) -> DeviceModel:
    """``dm`` with the work figures that bring ``alone_ms`` closest to measured passes:
    ``samples`` are (flops, moved bytes, kernels, measured ms) of passes timed alone on the
    device; the fit minimises the mean squared log error (Nelder-Mead within
    ``WORK_BOUNDS``, from the model's figures and from a launch-heavy start)."""
    rows = np.array([s for s in samples if s[3] > 0], dtype=np.float64)
    if len(rows) < len(WORK_BOUNDS):
        raise ValueError(f"{len(rows)} timed passes cannot fit {len(WORK_BOUNDS)} figures; "
                         f"give profiles with more layers or sizes")
    peak_tflops(dm, dtype)
    keys = list(WORK_BOUNDS)
    lo = np.array([WORK_BOUNDS[k][0] for k in keys])
    hi = np.array([WORK_BOUNDS[k][1] for k in keys])
    logs = np.log(rows[:, 3])

    def model_at(x: FloatArray) -> DeviceModel:
        return dm.with_figures(**dict(zip(keys, np.clip(x, lo, hi).tolist(), strict=True)))

    def f(x: FloatArray) -> float:
        pred = alone_ms(rows[:, 0], rows[:, 1], rows[:, 2], model_at(x), dtype)
        return float(np.mean((np.log(np.maximum(pred, 1e-9)) - logs) ** 2))

    best_x, best = None, math.inf
    for start in (np.array([getattr(dm, k) for k in keys]), np.array([1.0, 0.7, 0.05, 0.005])):
        x = start
        for scale in (0.1, 0.02):
            x = nelder_mead(f, np.clip(x, lo, hi), scale * (hi - lo), evals // 2)
        if f(x) < best:
            best_x, best = x, f(x)
    assert best_x is not None
    return model_at(best_x)
