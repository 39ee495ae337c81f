"""Cost model: stage compute, boundary communication and memory of a plan, from a profile.

    >>> from partitioner import CostModel, load_profile
    >>> cm = CostModel(load_profile("h200/gpt2-medium"), global_batch=16, microbatches=4,
    ...                recompute="always")
    >>> round(cm.stage_compute_ms(1, 25, stage=0), 1)   # 24 blocks at b=4, fwd twice
    56.5

Times at any micro-batch size b interpolate the measured sizes piecewise-linearly and
extrapolate linearly outside them, never below zero: small micro-batches on a GPU are
launch-bound, so time is *not* taken proportional to b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from partitioner.formats.assumptions import LINKS, OPTIMIZERS, Link, Optimizer, Runtime
from partitioner.formats.profile import DTYPE_BYTES, Profile
from partitioner.formats.values import ProfileValues, profile_values
from partitioner.schedule.generators import (
    MAX_MICROBATCHES,
    SCHEDULES,
    ScheduleName,
    in_flight,
)
from partitioner.schedule.recompute import RECOMPUTE_MODES, Recompute, recomputes

__all__ = ["CostModel", "FloatArray", "bytes_per_param", "dtype_bytes", "interpolate",
           "split_microbatches"]

FloatArray = npt.NDArray[np.float64]


def interpolate(table: FloatArray, sizes: tuple[int, ...], b: float) -> FloatArray:
    """Rows of ``table`` (one column per measured size) at micro-batch size b: piecewise
    linear between the sizes, linear outside them, never below zero.

        >>> interpolate(np.array([[1.0, 3.0]]), (1, 2), 4).tolist()
        [7.0]
    """
    n_sizes = len(sizes)
    table = table.reshape(-1, n_sizes)
    if n_sizes == 1:
        out: FloatArray = np.maximum(table[:, 0] * (b / sizes[0]), 0.0)
        return out
    lo = min(max(int(np.searchsorted(sizes, b)) - 1, 0), n_sizes - 2)
    x0, x1 = sizes[lo], sizes[lo + 1]
    y0, y1 = table[:, lo], table[:, lo + 1]
    out = np.maximum(y0 + (y1 - y0) * ((b - x0) / (x1 - x0)), 0.0)
    return out


def bytes_per_param(dtype: str, optimizer: str) -> float:
    """Training-state bytes per parameter: weight + gradient + optimizer state.

    - ``none``: weight and gradient in the model's dtype (2 x dtype bytes).
    - ``sgd``: plus one momentum buffer in the model's dtype (3 x).
    - ``adam``: plus two fp32 moments, plus an fp32 master copy when the model's dtype is
      narrower than fp32 (bf16: 2 + 2 + 4 + 4 + 4 = 16 bytes; fp32: 4 + 4 + 4 + 4 = 16 bytes).

        >>> bytes_per_param("bfloat16", "adam"), bytes_per_param("float32", "sgd")
        (16.0, 12.0)
    """
    width = float(dtype_bytes(dtype))
    if optimizer == "none":
        return 2 * width
    if optimizer == "sgd":
        return 3 * width
    if optimizer == "adam":
        master = 4.0 if width < 4 else 0.0
        return 2 * width + 8.0 + master
    raise ValueError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


def dtype_bytes(dtype: str) -> int:
    """Bytes of one element of ``dtype`` (``'bfloat16'`` or ``'torch.bfloat16'``)."""
    name = dtype.removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(
            f"dtype {dtype!r} is unknown; use one of {', '.join(sorted(DTYPE_BYTES))}"
        )
    return DTYPE_BYTES[name]


def split_microbatches(global_batch: int, microbatches: int) -> list[int]:
    """Sizes of the M micro-batches of a batch of B samples: as equal as possible, larger first.

        >>> split_microbatches(10, 4)
        [3, 3, 2, 2]
    """
    if not 1 <= microbatches <= MAX_MICROBATCHES:
        raise ValueError(f"microbatches M={microbatches} must be in 1..{MAX_MICROBATCHES}")
    if global_batch < microbatches:
        raise ValueError(
            f"global batch B={global_batch} is smaller than M={microbatches} micro-batches; "
            f"every micro-batch needs a sample: use M <= {global_batch} or a larger batch"
        )
    base, extra = divmod(global_batch, microbatches)
    return [base + 1] * extra + [base] * (microbatches - extra)


@dataclass(frozen=True)
class CostModel:
    """Per-layer costs of one configuration (B, M, recompute, schedule, link, optimizer).

    Stage k covers layers [start, end). Per micro-batch of the largest size b = ceil(B/M):
    compute = sum(fwd + bwd) (+ fwd again when the stage recomputes); communication = the
    stage sends the values of its last layer forward and the gradients of its input's values
    backward, each value one ``latency + bytes / bandwidth``; memory = params x
    bytes_per_param / dtype bytes (with the copies of tied parameters whose owner is in
    another stage) + activations held as the schedule holds them.
    """

    profile: Profile
    global_batch: int
    microbatches: int
    stages: int = 1
    recompute: Recompute = "never"
    schedule: ScheduleName = "gpipe"
    link: Link = field(default_factory=lambda: LINKS["free"])
    optimizer: Optimizer = "adam"
    runtime: Runtime = field(default_factory=Runtime)
    _cache: dict[tuple[str, float], FloatArray] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _values: list[ProfileValues] = field(
        default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        split_microbatches(self.global_batch, self.microbatches)  # validates B >= M >= 1
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute {self.recompute!r} is not one of {RECOMPUTE_MODES}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        bytes_per_param(self.profile.dtype, self.optimizer)  # validates dtype and optimizer
        if self.stages < 1:
            raise ValueError(f"stages K={self.stages} must be at least 1")

    # -- per-layer arrays -----------------------------------------------------------------------
    @property
    def microbatch_size(self) -> int:
        """b, the largest micro-batch (the first ones when B is not a multiple of M)."""
        return -(-self.global_batch // self.microbatches)

    def layer_array(self, key: str, b: float | None = None) -> FloatArray:
        """``key`` (e.g. ``'fwd_ms'``) of every layer at micro-batch size b (default: largest)."""
        b = self.microbatch_size if b is None else b
        cached = self._cache.get((key, b))
        if cached is not None:
            return cached
        out = self._interpolate_layers(key, b)
        if key in ("fwd_ms", "bwd_ms") and any(lay.launch_ms for lay in self.profile.layers):
            out = np.maximum(out, self._interpolate_layers("launch_ms", b))
        if key in ("fwd_ms", "bwd_ms") and self.runtime.compute_scale != 1.0:
            out = out * self.runtime.compute_scale
        out.setflags(write=False)
        self._cache[(key, b)] = out
        return out

    def _interpolate_layers(self, key: str, b: float) -> FloatArray:
        """``interpolate`` for every layer at once (absent optional figures count as 0)."""
        n_sizes = len(self.profile.microbatch_sizes)
        table = np.array([getattr(lay, key) or (0.0,) * n_sizes for lay in self.profile.layers],
                         dtype=np.float64)
        return interpolate(table, self.profile.microbatch_sizes, b)

    @property
    def values(self) -> ProfileValues:
        """The values that flow between layers (``formats.values``), normalised once."""
        if not self._values:
            self._values.append(profile_values(self.profile))
        return self._values[0]

    def value_bytes(self, b: float | None = None) -> FloatArray:
        """Bytes of every value at micro-batch size b (default: the largest)."""
        b = self.microbatch_size if b is None else b
        cached = self._cache.get(("value_bytes", b))
        if cached is None:
            cached = interpolate(self.values.table, self.profile.microbatch_sizes, b)
            cached.setflags(write=False)
            self._cache[("value_bytes", b)] = cached
        return cached

    def value_transfer_ms(self, b: float | None = None) -> FloatArray:
        """``link.transfer_ms`` of every value at size b: latency + bytes / bandwidth, 0 for
        a value of no bytes."""
        size = self.value_bytes(b)
        wire = (np.zeros_like(size) if math.isinf(self.link.bandwidth_gbps)
                else size / (self.link.bandwidth_gbps * 1e6))
        out: FloatArray = np.where(size > 0, self.link.latency_ms + wire, 0.0)
        return out

    def param_state_bytes(self) -> FloatArray:
        """Weights + gradients + optimizer state of every layer, in bytes."""
        cached = self._cache.get(("param_state_bytes", 0))
        if cached is None:
            per_param = bytes_per_param(self.profile.dtype, self.optimizer)
            width = dtype_bytes(self.profile.dtype)
            params = np.array([lay.param_bytes for lay in self.profile.layers], dtype=np.float64)
            cached = params * (per_param / width)
            cached.setflags(write=False)
            self._cache[("param_state_bytes", 0)] = cached
        return cached

    def recomputes(self, stage: int) -> bool:
        """Whether stage k re-materialises its activations (``schedule.recompute``'s rule)."""
        return recomputes(self.recompute, stage, self.stages)

    def in_flight(self, stage: int) -> int:
        """Micro-batches whose activations stage k holds at once (``generators.in_flight``)."""
        return in_flight(self.schedule, stage, self.stages, self.microbatches)

    def tied_state_bytes(self) -> FloatArray:
        """Training state (weights + gradients + optimizer) of each tied parameter's copy."""
        per_param = bytes_per_param(self.profile.dtype, self.optimizer)
        width = dtype_bytes(self.profile.dtype)
        sizes = np.array([t.bytes for t in self.profile.tied], dtype=np.float64)
        out: FloatArray = sizes * (per_param / width)
        return out

    def range_tied_bytes(self, start: int, end: int) -> float:
        """The tied copies a stage of layers [start, end) holds: every tied parameter that
        some of its layers use while its owner (the first listed layer) is elsewhere."""
        state = self.tied_state_bytes()
        return float(sum(state[t] for t, tie in enumerate(self.profile.tied)
                         if not start <= tie.layers[0] < end
                         and any(start <= i < end for i in tie.layers[1:])))

    def cut_send_ms(self) -> FloatArray:
        """Forward transfer time of the cut before layer c (c = 0..L): every value of layer
        c-1, one transfer each; 0 at both ends of the model."""
        return self._cut_ms("cut_send_ms", grads_only=False)

    def cut_grad_ms(self) -> FloatArray:
        """The gradients coming back over the cut before layer c: its values with grad."""
        return self._cut_ms("cut_grad_ms", grads_only=True)

    def _cut_ms(self, key: str, grads_only: bool) -> FloatArray:
        cached = self._cache.get((key, 0))
        if cached is not None:
            return cached
        vals, n = self.values, self.profile.num_layers
        ms = self.value_transfer_ms()
        if grads_only:
            ms = np.where(vals.grad, ms, 0.0)
        per_layer = np.bincount(vals.producer, ms, minlength=n).astype(np.float64)
        comm = np.zeros(n + 1)
        comm[1:-1] = per_layer[:-1]
        comm.setflags(write=False)
        self._cache[(key, 0)] = comm
        return comm

    # -- one stage ------------------------------------------------------------------------------
    def stage_compute_ms(self, start: int, end: int, stage: int) -> float:
        """Forward + backward (+ recomputed forward) of layers [start, end), one micro-batch,
        with the runtime's fixed cost of its two actions (F and B)."""
        fwd = float(self.layer_array("fwd_ms")[start:end].sum())
        bwd = float(self.layer_array("bwd_ms")[start:end].sum())
        return fwd + bwd + (fwd if self.recomputes(stage) else 0.0) + 2 * self.runtime.action_ms

    def stage_comm_ms(self, start: int, end: int) -> float:
        """Sending the output forward and the input's gradient backward, one micro-batch."""
        return float(self.cut_grad_ms()[start] + self.cut_send_ms()[end])

    def stage_memory_bytes(self, start: int, end: int, stage: int) -> float:
        """Training state + activations of stage k at its peak, as the closed form gives it."""
        state = float(self.param_state_bytes()[start:end].sum())
        if self.profile.tied:
            state += self.range_tied_bytes(start, end)
        saved = float(self.layer_array("saved_bytes")[start:end].sum())
        held = self.in_flight(stage)
        if self.recomputes(stage):
            stash = float(self.layer_array("in_bytes")[start])
            return state + held * stash + saved
        return state + held * saved
