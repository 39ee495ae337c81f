"""Cost model: stage compute, boundary communication and memory of a plan, from a profile.

    >>> from partitioner import CostModel, load_profile
    >>> cm = CostModel(load_profile("h200/gpt2-medium"), global_batch=16, microbatches=4,
    ...                recompute="always")
    >>> round(cm.stage_compute_ms(1, 25, stage=0), 1)   # 24 blocks at b=4, fwd twice
    56.5

Times at any micro-batch size b interpolate the measured sizes piecewise-linearly and
extrapolate linearly outside them, never below zero: small micro-batches on a GPU are
launch-bound, so time is *not* taken proportional to b.

Schedules that split the backward (``zb-h1``, ``zbv``) run I (input gradient) and W (weight
gradient) instead of B: per layer the profile's ``bwd_input_ms`` and ``bwd_weight_ms`` where
it measured them, else ``bwd_ms`` split by one stated rule (``layer_array``). What a schedule
holds in memory, and so what a stage's activations weigh, is ``cost.holding``'s rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from partitioner.cost.activations import ActivationTerms, activation_terms
from partitioner.cost.holding import SPLIT_SCHEDULES, Holding, holding
from partitioner.cost.instep import layer_host_device_ms, pooled_layers
from partitioner.cost.sizes import (
    WEIGHT_GRAD_SHARE,
    FloatArray,
    interpolate,
    split_backward,
    split_microbatches,
)
from partitioner.cost.state import bytes_per_param, dtype_bytes
from partitioner.formats.assumptions import LINKS, Link, Optimizer, Runtime
from partitioner.formats.profile import Profile
from partitioner.formats.topology import ALLREDUCE_MODES, AllReduce
from partitioner.formats.values import ProfileValues, profile_values
from partitioner.schedule.generators import (
    SCHEDULES,
    ScheduleName,
    stages_per_rank_of,
)
from partitioner.schedule.recompute import RECOMPUTE_MODES, Recompute, recomputes

__all__ = ["WEIGHT_GRAD_SHARE", "CostModel", "FloatArray", "bytes_per_param", "dtype_bytes",
           "interpolate", "split_microbatches"]

_SPLIT_KEYS = ("bwd_input_ms", "bwd_weight_ms")
_TIMED_KEYS = ("fwd_ms", "bwd_ms", *_SPLIT_KEYS, "recompute_ms")


@dataclass(frozen=True)
class CostModel:
    """Per-layer costs of one configuration (B, M, recompute, schedule, link, optimizer).

    Stage k covers layers [start, end). Per micro-batch of the largest size b = ceil(B/M):
    compute = sum(fwd + bwd) (+ fwd again when the stage recomputes), with bwd the split
    backward's I + W under a schedule that splits it; communication = the
    stage sends the values of its last layer forward and the gradients of its input's values
    backward, each value one ``latency + bytes / bandwidth``; memory = params x
    bytes_per_param / dtype bytes (with the copies of tied parameters whose owner is in
    another stage) + activations held as the schedule holds them. ``stages_per_rank`` is V,
    the stages each rank runs (``interleaved``: any V that divides K; ``zbv``: always 2).

    ``replicas`` D copies of the pipeline each take B/D samples in M micro-batches (so b =
    B/(D M)) and all-reduce each stage's gradients over ``allreduce_link``, ``overlapped``
    with the drain or ``after`` the pipeline's compute (``allreduce``); with
    ``shard_optimizer`` (ZeRO-1) each copy keeps 1/D of its stages' optimizer state.
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
    stages_per_rank: int = 1
    replicas: int = 1
    shard_optimizer: bool = False
    allreduce_link: Link = field(default_factory=lambda: LINKS["free"])
    allreduce: AllReduce = "overlapped"
    _cache: dict[tuple[str, float], FloatArray] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _values: list[ProfileValues] = field(
        default_factory=list, init=False, repr=False, compare=False)
    # per-layer arrays that depend on the profile and the runtime alone: ``like`` shares them
    _layers: dict[tuple[str, float], FloatArray] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _terms: dict[float, ActivationTerms] = field(  # ``activations`` per size, shared too
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        d = self.replicas
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"replicas D={d!r} must be a whole number >= 1 (1: one pipeline, "
                             f"no data parallelism)")
        if self.global_batch % d:
            raise ValueError(f"global batch B={self.global_batch} does not split into D={d} "
                             f"equal shares; choose B a multiple of {d}, or replicas that "
                             f"divide {self.global_batch}")
        if self.allreduce not in ALLREDUCE_MODES:
            raise ValueError(f"allreduce {self.allreduce!r} is not one of "
                             f"{', '.join(ALLREDUCE_MODES)}")
        if d > 1 and self.replica_batch < self.microbatches:
            raise ValueError(f"each of the D={d} replicas gets B/D={self.replica_batch} "
                             f"samples, fewer than M={self.microbatches} micro-batches; every "
                             f"micro-batch needs a sample: use M <= {self.replica_batch}, "
                             f"fewer replicas or a larger batch")
        split_microbatches(self.replica_batch, self.microbatches)  # validates B/D >= M >= 1
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute {self.recompute!r} is not one of {RECOMPUTE_MODES}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        bytes_per_param(self.profile.dtype, self.optimizer)  # validates dtype and optimizer
        if self.stages < 1:
            raise ValueError(f"stages K={self.stages} must be at least 1")
        if self.schedule == "zbv" and self.stages_per_rank == 1:
            object.__setattr__(self, "stages_per_rank", 2)  # the V shape: two stages per rank
        stages_per_rank_of(self.schedule, self.stages, self.stages_per_rank)

    def like(self, **changes: object) -> CostModel:
        """This configuration with ``changes`` (``dataclasses.replace``), sharing the per-layer
        arrays already computed when the profile and the runtime stay (a search builds
        thousands of configurations of one profile).

            >>> from partitioner import load_profile
            >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4)
            >>> other = cm.like(stages=2, schedule="1f1b")
            >>> other.stages, other.layer_array("fwd_ms") is cm.layer_array("fwd_ms")
            (2, True)
        """
        new = replace(self, **changes)  # type: ignore[arg-type]
        if new.profile is self.profile and new.runtime == self.runtime:
            object.__setattr__(new, "_layers", self._layers)
            object.__setattr__(new, "_values", self._values)
            object.__setattr__(new, "_terms", self._terms)
        return new

    # -- per-layer arrays -----------------------------------------------------------------------
    @property
    def replica_batch(self) -> int:
        """B/D: the samples of one replica's pipeline per step."""
        return self.global_batch // self.replicas

    @property
    def microbatch_size(self) -> int:
        """b, the largest micro-batch (the first ones when B/D is not a multiple of M)."""
        return -(-self.replica_batch // self.microbatches)

    def layer_array(self, key: str, b: float | None = None) -> FloatArray:
        """``key`` (e.g. ``'fwd_ms'``) of every layer at micro-batch size b (default: largest).

        ``bwd_input_ms`` and ``bwd_weight_ms`` (I and W) are the profile's where a layer has
        them, else this rule on its ``bwd_ms``: a layer without parameters has W = 0 and I =
        bwd; one with parameters W = bwd x ``WEIGHT_GRAD_SHARE`` and I = the rest. Like
        ``fwd_ms`` and ``bwd_ms`` they take the runtime's ``compute_scale`` and the layer's
        ``launch_ms`` as a floor (W only where it has work: a layer without a weight gradient
        launches nothing in W). ``recompute_ms`` is the forward a recomputing stage runs again
        in its backward: ``fwd_ms``, or the device model's (its host issues it through
        activation checkpointing's hooks). With the runtime's device model (a GPU) every time is
        the layer's in a step instead (``cost.instep``), the ``launch_ms`` its host's floor:
        ``max(host, device)``, or one of the two by ``host:`` or ``device:`` before the key
        (without a device model: no host time, the device's the time itself)."""
        b = self.microbatch_size if b is None else b
        cached = self._layers.get((key, b))
        if cached is not None:
            return cached
        side, _, name = key.rpartition(":")
        timed, device = name in _TIMED_KEYS, self.runtime.device
        if side not in ("", "host", "device") or (side and not timed):
            raise ValueError(f"layer key {key!r}: host: and device: go before a time key, "
                             f"one of {', '.join(_TIMED_KEYS)}")
        launch = (self._interpolate_layers("launch_ms", b) if timed and any(
            lay.launch_ms for lay in self.profile.layers) else None)
        if name == "recompute_ms" and device is None:  # the same forward again
            out = self.layer_array(key.replace("recompute_ms", "fwd_ms"), b)
        elif timed and device is not None:
            host, dev = layer_host_device_ms(self.profile.microbatch_sizes, name, b, device,
                                             self._alone_table, launch)
            out = host if side == "host" else dev if side == "device" else np.maximum(host, dev)
        elif side == "host":
            out = np.zeros(self.profile.num_layers)
        else:
            out = self._split_layers(name, b) if name in _SPLIT_KEYS else (
                self._interpolate_layers(name, b))
            if launch is not None:
                out = np.maximum(out, launch if name != "bwd_weight_ms" else np.where(
                    out > 0, launch, 0.0))
        if timed and self.runtime.compute_scale != 1.0 and not (
                name == "recompute_ms" and device is None):
            out = out * self.runtime.compute_scale
        out.setflags(write=False)
        self._layers[(key, b)] = out
        return out

    def _alone_table(self, key: str) -> FloatArray:
        """``key``'s alone times, a column per measured size, pooled (``cost.instep``)."""
        table = self._layers.get((f"pooled:{key}", 0))
        if table is None:
            table = self._layers[(f"pooled:{key}", 0)] = pooled_layers(self.profile, np.stack(
                [self._split_layers(key, s) if key in _SPLIT_KEYS else
                 self._interpolate_layers(key, s) for s in self.profile.microbatch_sizes], axis=1))
        return table

    def _interpolate_layers(self, key: str, b: float) -> FloatArray:
        """``interpolate`` for every layer at once (absent optional figures count as 0)."""
        n_sizes = len(self.profile.microbatch_sizes)
        table = np.array([getattr(lay, key) or (0.0,) * n_sizes for lay in self.profile.layers],
                         dtype=np.float64)
        return interpolate(table, self.profile.microbatch_sizes, b)

    def _split_layers(self, key: str, b: float) -> FloatArray:
        """I or W of every layer before the runtime (``sizes.split_backward``)."""
        return interpolate(split_backward(self.profile, key), self.profile.microbatch_sizes, b)

    @property
    def splits_backward(self) -> bool:
        """Whether the schedule runs each backward as I and W (``zb-h1``, ``zbv``)."""
        return self.schedule in SPLIT_SCHEDULES

    @property
    def compute_actions(self) -> int:
        """Compute actions per micro-batch and stage, each paying ``runtime.action_ms``: F and
        B, or F, I and W."""
        return 3 if self.splits_backward else 2

    def backward_ms(self, b: float | None = None) -> FloatArray:
        """Every layer's backward as the schedule runs it: ``bwd_ms``, or I + W when split."""
        if not self.splits_backward:
            return self.layer_array("bwd_ms", b)
        b = self.microbatch_size if b is None else b
        cached = self._layers.get(("split_backward_ms", b))
        if cached is None:
            cached = self.layer_array("bwd_input_ms", b) + self.layer_array("bwd_weight_ms", b)
            cached.setflags(write=False)
            self._layers[("split_backward_ms", b)] = cached
        return cached

    def activations(self, b: float | None = None) -> ActivationTerms:
        """What a chain stage holds per micro-batch of size b (default: the largest), term by
        term (``cost.activations``: exact where the profile says what neighbouring layers
        share, else the older per-layer sum; the loss's with the last layer where given)."""
        b = self.microbatch_size if b is None else b
        terms = self._terms.get(b)
        if terms is None:
            exact = self.profile.edges is None and all(
                lay.saved_input_bytes is not None for lay in self.profile.layers)
            saved_in, saved_out = ((self._interpolate_layers(k, b) if exact else None)
                                   for k in ("saved_input_bytes", "saved_output_bytes"))
            loss_saved, loss_in = self._loss_at(b, "saved_bytes", "saved_input_bytes")
            held_w = None  # what a split backward keeps until W, where every layer says
            if all(lay.held_for_w_bytes is not None for lay in self.profile.layers):
                held_w = (self._interpolate_layers("held_for_w_bytes", b),
                          self._interpolate_layers("held_for_w_input_bytes", b))
            terms = self._terms[b] = activation_terms(
                self.layer_array("saved_bytes", b), saved_in, saved_out,
                self.layer_array("in_bytes", b), (loss_saved, loss_in), held_w)
        return terms

    def _loss_at(self, b: float, *keys: str) -> tuple[float, ...]:
        """The profile's ``loss`` figures ``keys`` at size b (0 without them)."""
        loss = self.profile.loss
        if loss is None:
            return (0.0,) * len(keys)
        table = np.array([getattr(loss, k) for k in keys], dtype=np.float64)
        return tuple(float(x) for x in interpolate(table, self.profile.microbatch_sizes, b))

    def step_bytes(self) -> tuple[float, float]:
        """What the first and the last stage hold for the whole step besides their micro-
        batches: the replica's share of the inputs (exact activation terms only, else 0) and
        of the targets (where the profile has its loss's ``target_bytes``, else 0)."""
        key = (f"step_bytes:{self.microbatches}", float(self.replica_batch))
        cached = self._layers.get(key)  # shared by ``like``: a search asks it per partition
        if cached is None:
            sizes = split_microbatches(self.replica_batch, self.microbatches)
            counts = {b: sizes.count(b) for b in set(sizes)}  # at most two sizes
            inputs = (sum(n * float(self.layer_array("in_bytes", b)[0])
                          for b, n in counts.items()) if self.activations().exact else 0.0)
            targets = sum(n * self._loss_at(b, "target_bytes")[0] for b, n in counts.items())
            cached = self._layers[key] = np.array([inputs, targets])
        return float(cached[0]), float(cached[1])

    @property
    def values(self) -> ProfileValues:
        """The values that flow between layers (``formats.values``), normalised once."""
        if not self._values:
            self._values.append(profile_values(self.profile))
        return self._values[0]

    def value_bytes(self, b: float | None = None) -> FloatArray:
        """Bytes of every value at micro-batch size b (default: the largest)."""
        b = self.microbatch_size if b is None else b
        cached = self._layers.get(("value_bytes", b))
        if cached is None:
            cached = interpolate(self.values.table, self.profile.microbatch_sizes, b)
            cached.setflags(write=False)
            self._layers[("value_bytes", b)] = cached
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
            params = np.array([lay.param_bytes for lay in self.profile.layers], dtype=np.float64)
            cached = params * self._state_per_param_byte()
            cached.setflags(write=False)
            self._cache[("param_state_bytes", 0)] = cached
        return cached

    def recomputes(self, stage: int) -> bool:
        """Whether stage k re-materialises its activations (``schedule.recompute``'s rule)."""
        return recomputes(self.recompute, stage, self.stages)

    @property
    def holding(self) -> Holding:
        """What the schedule holds per stage, and the rank of each stage (``cost.holding``)."""
        return holding(self.schedule, self.stages, self.microbatches, self.stages_per_rank)

    def in_flight(self, stage: int) -> int:
        """Micro-batches whose activations stage k holds at once (``generators.in_flight``,
        with V stages per rank): from F until B, or until W when the backward is split."""
        return self.holding.in_flight[stage]

    def rebuilt(self, stage: int) -> int:
        """Micro-batches whose saved activations stage k holds rebuilt at once when it
        recomputes: 1 (during B), or the most between I and W under a split schedule."""
        return self.holding.rebuilt[stage]

    def _state_per_param_byte(self) -> float:
        """Training-state bytes per byte of parameters: ``bytes_per_param`` / dtype bytes,
        with the optimizer's share (all but weight and gradient) over D when sharded."""
        per_param = bytes_per_param(self.profile.dtype, self.optimizer)
        width = dtype_bytes(self.profile.dtype)
        if self.shard_optimizer and self.replicas > 1:
            per_param = 2 * width + (per_param - 2 * width) / self.replicas
        return per_param / width

    def tied_state_bytes(self) -> FloatArray:
        """Training state (weights + gradients + optimizer) of each tied parameter's copy."""
        sizes = np.array([t.bytes for t in self.profile.tied], dtype=np.float64)
        out: FloatArray = sizes * self._state_per_param_byte()
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
        with the runtime's fixed cost of each of its actions (F and B, or F, I and W)."""
        fwd = float(self.layer_array("fwd_ms")[start:end].sum())
        bwd = float(self.backward_ms()[start:end].sum())
        again = float(self.layer_array("recompute_ms")[start:end].sum())
        return fwd + bwd + (again if self.recomputes(stage) else 0.0) + (
            self.compute_actions * self.runtime.action_ms)

    def stage_comm_ms(self, start: int, end: int) -> float:
        """Sending the output forward and the input's gradient backward, one micro-batch."""
        return float(self.cut_grad_ms()[start] + self.cut_send_ms()[end])

    def stage_memory_bytes(self, start: int, end: int, stage: int) -> float:
        """Training state + activations of stage k at its peak, as the closed form gives it
        (``stage_activation_bytes``); the first stage also holds the batch's inputs, the last
        its targets (``step_bytes``)."""
        state = float(self.param_state_bytes()[start:end].sum())
        if self.profile.tied:
            state += self.range_tied_bytes(start, end)
        acts = self.stage_activation_bytes(start, end, stage)
        inputs, targets = self.step_bytes()
        return state + acts + (inputs if start == 0 else 0.0) + (
            targets if end == self.profile.num_layers else 0.0)

    def stage_activation_bytes(self, start: int, end: int, stage: int) -> float:
        """Stage k's activations at their peak, all at the largest micro-batch: the largest
        over the schedule's states (``Holding.activation_bytes``) of the micro-batches held
        until I or B, those between I and W, and one being rebuilt, each with its bytes
        (``cost.activations``): the peak the simulator's replay reaches."""
        terms, rc = self.activations(), self.recomputes(stage)
        return self.holding.activation_bytes(
            stage, terms.held(start, end, rc), terms.held_for_w(start, end, rc),
            terms.rebuilt(start, end) if rc else 0.0)

    def rank_memory_bytes(self, ranges: Sequence[tuple[int, int]]) -> list[float]:
        """Per rank, the closed-form memory of the stages it runs (``ranges[k]`` = stage k's
        layers; the schedule's placement says which rank runs it): the sum of their
        ``stage_memory_bytes``, an upper bound of the rank's replayed peak, since its stages
        need not peak at the same time. With one stage per rank, the stages' figures.

            >>> from partitioner import load_profile
            >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=4,
            ...                schedule="zbv")
            >>> ranges = [(0, 7), (7, 14), (14, 20), (20, 26)]
            >>> cm.rank_memory_bytes(ranges)[0] == sum(cm.stage_memory_bytes(*ranges[k], k)
            ...                                        for k in (0, 3))
            True
        """
        if len(ranges) != self.stages:
            raise ValueError(f"{len(ranges)} stage ranges given but the cost model has "
                             f"K={self.stages}; give one (start, end) per stage")
        out = [0.0] * self.holding.ranks
        for k, (start, end) in enumerate(ranges):
            out[self.holding.rank_of[k]] += self.stage_memory_bytes(start, end, k)
        return out
