"""A layer's time alone on a device it never ran on: from its kernels' work and the device's figures.

    >>> from partitioner.formats.device import DeviceModel
    >>> dm = DeviceModel("toy", peak_tflops=(("bfloat16", 100.0),), memory_gbps=1000.0,
    ...                  half_work_gflop=1.0, layer_launch_ms=0.01, kernel_launch_ms=0.005)
    >>> small = PassWork.of([[(10**9, 10**6, 0), (0, 10**6, 0)]], [2])     # a tiny pass
    >>> big = PassWork.of([[(10**12, 10**8, 0), (0, 10**9, 0)]], [2])      # a product + a copy
    >>> [round(float(alone_ms(w, dm, "bfloat16")[0]), 4) for w in (small, big)]
    [0.021, 11.01]

For one pass of one layer (its forward, or its backward), made of kernels i with ``flops_i``
FLOPs and ``moved_i`` bytes read and written (``executor.profiling.meta`` counts them on the
meta device), timed alone as a profiler times it:

    time = max(launch, sum over kernels of max(compute_i, memory_i))
    launch = layer_launch_ms + kernels x (kernel_launch_ms, or backward_kernel_launch_ms)
             + views x view_launch_ms     (ops dispatched that launch no kernel)
    compute_i = (flops_i + half_work) / (peak x (conv_efficiency for a convolution, else 1))
    memory_i = moved_i / (memory_gbps x memory_efficiency)

a roofline per kernel, where a kernel of ``flops`` runs at ``flops / (flops + half_work)`` of
the peak rate (half of it at ``half_work_gflop``: small matrix products do not fill the
device), kernels run one after the other, and a layer too small to keep the device busy
costs its launches. The fitted figures come from measured profiles of the same device
(``fit_work_figures``), the peaks from the vendor or a measurement (``formats.device``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from partitioner.cost.fit import minimise_within
from partitioner.cost.sizes import FloatArray
from partitioner.formats.device import DeviceModel

__all__ = ["WORK_BOUNDS", "PassWork", "alone_ms", "fit_work_figures", "peak_tflops"]

#: The range each fitted work figure is searched in.
#: A second start for the fit (figures in ``WORK_BOUNDS``' order): launches weigh much.
_LAUNCH_HEAVY = (1.0, 0.7, 0.1, 0.05, 0.05, 0.03, 0.01)
WORK_BOUNDS = {"half_work_gflop": (0.0, 100.0), "memory_efficiency": (0.05, 1.0),
               "conv_efficiency": (0.005, 1.0), "layer_launch_ms": (0.0, 1.0),
               "kernel_launch_ms": (0.0, 0.2), "backward_kernel_launch_ms": (0.0, 0.2),
               "view_launch_ms": (0.0, 0.1)}


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


@dataclass(frozen=True)
class PassWork:
    """Passes as flat arrays: kernel j's FLOPs, bytes, whether it is a convolution, and the
    pass it belongs to; each pass's kernel count and whether it is a backward."""

    flops: FloatArray
    moved: FloatArray
    conv: npt.NDArray[np.bool_]
    owner: npt.NDArray[np.int64]
    kernels: FloatArray
    backward: npt.NDArray[np.bool_]
    views: FloatArray

    @staticmethod
    def of(ops: Sequence[Sequence[tuple[int, int, int]]], kernels: Sequence[int],
           backward: Sequence[bool] | None = None, views: Sequence[int] | None = None
           ) -> PassWork:
        """From each pass's (FLOPs, bytes, convolution) per kernel, its kernel count, whether
        it is a backward (default: none is) and its ops without a kernel (default: 0)."""
        flat = [(f, m, c, j) for j, pass_ops in enumerate(ops) for f, m, c in pass_ops]
        arr = np.array(flat, dtype=np.float64).reshape(-1, 4)
        back = np.zeros(len(kernels), dtype=bool) if backward is None else np.array(
            backward, dtype=bool)
        return PassWork(arr[:, 0], arr[:, 1], arr[:, 2] > 0, arr[:, 3].astype(np.int64),
                        np.array(kernels, dtype=np.float64), back,
                        np.zeros(len(kernels)) if views is None else np.array(
                            views, dtype=np.float64))


def alone_ms(work: PassWork, dm: DeviceModel, dtype: str) -> FloatArray:
    """Each pass's time alone (see the module's docstring)."""
    peak = peak_tflops(dm, dtype) * 1e9  # FLOPs per ms
    rate = np.where(work.conv, peak * dm.conv_efficiency, peak)
    compute = np.where(work.flops > 0, (work.flops + dm.half_work_gflop * 1e9) / rate, 0.0)
    memory = work.moved / (dm.memory_gbps * 1e6 * dm.memory_efficiency)
    device = np.bincount(work.owner, np.maximum(compute, memory), minlength=len(work.kernels))
    per_kernel = np.where(work.backward, dm.backward_kernel_launch_ms, dm.kernel_launch_ms)
    launch = np.where(work.kernels > 0, dm.layer_launch_ms + work.kernels * per_kernel
                      + work.views * dm.view_launch_ms, 0.0)
    out: FloatArray = np.maximum(launch, device)
    return out


def fit_work_figures(work: PassWork, measured_ms: FloatArray, dm: DeviceModel, dtype: str,
                     evals: int = 600) -> DeviceModel:
    """``dm`` with the work figures that bring ``alone_ms(work)`` closest to the passes'
    ``measured_ms`` alone on the device (passes measured at 0 are left out); the fit minimises
    the mean squared log error (Nelder-Mead within ``WORK_BOUNDS``, from the model's figures
    and from a launch-heavy start)."""
    timed = measured_ms > 0
    if timed.sum() < len(WORK_BOUNDS):
        raise ValueError(f"{int(timed.sum())} timed passes cannot fit {len(WORK_BOUNDS)} "
                         f"figures; give profiles with more layers or sizes")
    peak_tflops(dm, dtype)
    keys = list(WORK_BOUNDS)
    lo = np.array([WORK_BOUNDS[k][0] for k in keys])
    hi = np.array([WORK_BOUNDS[k][1] for k in keys])
    logs = np.log(measured_ms[timed])

    def model_at(x: FloatArray) -> DeviceModel:
        return dm.with_figures(**dict(zip(keys, x.tolist(), strict=True)))

    def f(x: FloatArray) -> float:
        pred = alone_ms(work, model_at(x), dtype)[timed]
        return float(np.mean((np.log(np.maximum(pred, 1e-9)) - logs) ** 2))

    starts = ([getattr(dm, k) for k in keys], _LAUNCH_HEAVY)
    return model_at(minimise_within(f, lo, hi, starts, evals))
