"""Exact lower bounds of a configuration's simulated step, so a search can skip what cannot win.

    >>> from partitioner import CostModel, load_profile
    >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=2)
    >>> from partitioner.simulator.engine import simulate
    >>> work_bound_ms(cm) <= simulate(cm, [(0, 13), (13, 26)], record=False).step_ms
    True

Two bounds, each at most the step ``simulate`` replays (no shared devices, no optimizer step:
what the search simulates):

- ``work_bound_ms``, before any partition: a rank runs its actions one at a time, so some
  rank computes at least the replica's whole compute C over the R ranks (every layer's F and
  backward at each micro-batch's size, the forward again in the layers that recompute whatever
  the cuts: all of them with ``always``, the first K-1 with ``except_last``, plus the runtime's
  cost of each action). With D replicas, each stage's ring all-reduce comes after its last
  backward; the K rings together move at least the whole model's gradients, so they take at
  least A = one ring of all of them over the fastest link a layout offers. With one stage per
  rank (or ``after``: every ring after all compute) a stage's compute and its ring follow one
  another: step >= (C + A) / R; with several stages per rank, max(C, A) / R.
- ``stage_bound_ms``, once the partition is known, from the simulator's own durations: per
  rank, all its stages' compute and sends; with one stage per rank also the forward of the
  first micro-batch reaching the stage (the fill) before it, and per stage its compute then
  its all-reduce (``overlapped``), or every rank's work then its rings (``after``).

Under a device model (two clocks: the host issues, the device runs, ``simulator.engine``)
each sum is taken on each clock apart, the larger kept: a rank's host and its device each do
their share one action at a time, but an action's span is not a lower bound of what it adds
(the host may have issued it while the device ran the one before). The fill still sums
spans: a stage's host waits for the first forward from the rank before it.

The search compares them with a margin (``SLACK``) for the rounding of sums taken in another
order, so a skipped configuration is provably slower than what it is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from partitioner.cost.allreduce import grad_bytes, ring_allreduce_ms
from partitioner.cost.model import CostModel, FloatArray, split_microbatches
from partitioner.formats.assumptions import Link
from partitioner.schedule.generators import v_placement
from partitioner.simulator.durations import Durations

__all__ = ["SLACK", "rank_of", "stage_bound_ms", "work_bound_ms"]

#: Relative margin by which a bound must exceed a step to prove the step is smaller.
SLACK = 1e-9


def rank_of(cm: CostModel) -> tuple[int, ...]:
    """The rank of each stage under ``cm``'s schedule, without generating the schedule.

        >>> from partitioner import load_profile
        >>> rank_of(CostModel(load_profile("h200/gpt2-medium"), 8, 4, stages=4, schedule="zbv"))
        (0, 1, 1, 0)
    """
    big_k, v = cm.stages, cm.stages_per_rank
    if cm.schedule == "zbv":
        return v_placement(big_k // 2)
    if v > 1:
        return tuple(s % (big_k // v) for s in range(big_k))
    return tuple(range(big_k))


def work_bound_ms(cm: CostModel, allreduce_links: Sequence[Link] = ()) -> float:
    """The partition-free bound (see the module docstring); ``allreduce_links``: the links
    the layouts would give the all-reduce (the fastest is taken; none: no all-reduce)."""
    big_k, ranks = cm.stages, cm.stages // cm.stages_per_rank
    forced = big_k if cm.recompute == "always" else (
        big_k - 1 if cm.recompute == "except_last" else 0)  # layers that recompute surely
    sizes = split_microbatches(cm.replica_batch, cm.microbatches)
    compute = 0.0
    for side in _sides(cm):  # the device's work and, with a device model, the host's apart
        work = 0.0
        for b in set(sizes):
            again = cm.layer_array(side + "recompute_ms", b)
            work += sizes.count(b) * (float(cm.layer_array(side + "fwd_ms", b).sum()) + float(
                _backward(cm, side, b).sum()) + float(again[:forced].sum()))
        compute = max(compute, work)
    compute += cm.microbatches * big_k * cm.compute_actions * cm.runtime.action_ms
    ring = 0.0
    if cm.replicas > 1 and allreduce_links:
        total = float(grad_bytes(cm).sum())
        ring = min(ring_allreduce_ms(total, cm.replicas, link) for link in allreduce_links)
    if cm.stages_per_rank == 1 or cm.allreduce == "after":
        bound = (compute + ring) / ranks
    else:
        bound = max(compute, ring) / ranks
    if cm.stages_per_rank == 1:
        bound = max(bound, _fill_bound_ms(cm, sizes))
    return bound


def _fill_bound_ms(cm: CostModel, sizes: list[int]) -> float:
    """One stage per rank: stage k starts once the first micro-batch's forward crossed the
    layers before it, then runs all its micro-batches: step >= F0(s_k) + W(e_k) - W(s_k)
    (prefix sums over the layers of the first micro-batch's forward and of every
    micro-batch's F and backward). With F0 >= rho W layer by layer, cuts as far as that
    allows reach at most (1 - (1 - rho)^K) T / rho of the work: T >= rho W / (1 - (1-rho)^K)."""
    bound = 0.0
    for side in _sides(cm):  # a stage's host and its device each wait for the first forward
        fwd0 = cm.layer_array(side + "fwd_ms", sizes[0])
        work = np.zeros(cm.profile.num_layers)
        for b in set(sizes):
            work = work + sizes.count(b) * (cm.layer_array(side + "fwd_ms", b)
                                            + _backward(cm, side, b))
        total = float(work.sum())
        positive = work > 0
        if total <= 0 or not positive.any():
            continue
        rho = min(1.0, float((fwd0[positive] / work[positive]).min()))
        bound = max(bound, total / cm.stages if rho < 1e-12 else
                    rho * total / (1.0 - (1.0 - rho) ** cm.stages))
    return bound


def _sides(cm: CostModel) -> tuple[str, ...]:
    """The clocks a bound sums over: the device's and the host's under a device model (each
    bounds the step alone; their per-layer maxima summed do not), else the one."""
    return ("device:", "host:") if cm.runtime.device is not None else ("",)


def _backward(cm: CostModel, side: str, b: float) -> FloatArray:
    """``cm.backward_ms(b)`` on one clock (``side``: ``device:``, ``host:`` or none)."""
    if not side:
        return cm.backward_ms(b)
    if not cm.splits_backward:
        return cm.layer_array(side + "bwd_ms", b)
    out: FloatArray = cm.layer_array(side + "bwd_input_ms", b) + cm.layer_array(
        side + "bwd_weight_ms", b)
    return out


def stage_bound_ms(cm: CostModel, dur: Durations, ranks_of: Sequence[int]) -> float:
    """The bound once the stages' durations ``dur`` are known (``ranks_of[k]``: stage k's
    rank, one device each)."""
    big_k, split = len(ranks_of), cm.splits_backward
    counts = [0] * len(dur.fwd_ms[0])
    for s in dur.size_index:
        counts[s] += 1
    # per stage: the device's time of its actions (their spans without a device model), the
    # host's (0 without one), its sends (on the device's clock)
    device = dur.device_ms or (dur.fwd_ms, dur.bwd_ms, dur.input_ms, dur.weight_ms)
    host = dur.host_ms
    run, issue, sends = [0.0] * big_k, [0.0] * big_k, [0.0] * big_k
    for k in range(big_k):
        sf, sb = dur.send_f_ms[k], dur.send_b_ms[k]
        for s, n in enumerate(counts):
            run[k] += n * _per_microbatch(device, k, s, split)
            if host:
                issue[k] += n * _per_microbatch(host, k, s, split)
            sends[k] += n * (sf[s] + sb[s])
    ranks = max(ranks_of) + 1
    on_device, on_host = [0.0] * ranks, [0.0] * ranks
    for k in range(big_k):
        on_device[ranks_of[k]] += run[k] + sends[k]
        on_host[ranks_of[k]] += issue[k]
    bound = max(max(on_device), max(on_host))
    compute = [max(r, i) for r, i in zip(run, issue, strict=True)]
    ar = dur.allreduce_ms or (0.0,) * big_k
    if cm.allreduce == "after" and dur.allreduce_ms:
        rings = [0.0] * ranks
        for k in range(big_k):
            rings[ranks_of[k]] += ar[k]
        return bound + max(rings)
    one_each = ranks == big_k
    fill, s0 = 0.0, dur.size_index[0]
    for k in range(big_k):
        start = fill if one_each else 0.0
        bound = max(bound, start + compute[k] + ar[k])
        if one_each:  # its host and device both start once the first forward reached it
            bound = max(bound, start + max(run[k] + sends[k], issue[k]))
            sent = dur.send_f_ms[k][s0]
            fill += dur.fwd_ms[k][s0] + sent + (dur.message_ms if sent > 0 else 0.0)
    return bound


def _per_microbatch(tables: Sequence[Sequence[Sequence[float]]], k: int, s: int,
                    split: bool) -> float:
    """Stage k's F and backward (B, or I + W) at size s from (F, B, I, W) ``tables``."""
    f, b, i, w = (table[k][s] for table in tables)
    return f + (i + w if split else b)
