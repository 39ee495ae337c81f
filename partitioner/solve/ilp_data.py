"""The CP-SAT model's data: the cost model's figures of a layer graph scaled to integers.

    >>> from partitioner import CostModel, load_profile
    >>> d = scale(CostModel(load_profile("pipedream/resnet18"), 4, 4, stages=2), float("inf"))
    >>> d.num_layers, len(d.producer), d.limit    # every layer but the last sends a value
    (70, 69, None)

Times are integers in steps of ``unit_ms`` = (the largest possible stage time) / 2**24, each
coefficient rounded to the nearest step; bytes in steps of ``unit_bytes`` >= 1 (limit / 2**32),
terms rounded up and the limit down (``ilp``'s docstring says why both are safe). Memory takes
each layer's saved bytes whole (with the loss's on the last layer, the batch on the first and
the targets on the last); on a chain profile that says what neighbouring layers share, each
layer's ``ActivationTerms.bound`` (also the part of its input it does not save, which a stage
it starts holds): an upper bound of the exact terms (``cost.activations``) the chain DP uses;
under a split schedule, the larger of that and what the layer keeps from I until W (a
micro-batch is in one state or the other, and ``in_flight`` counts both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from partitioner.cost.model import CostModel
from partitioner.formats.layers import layer_edges, reach_counts

__all__ = ["Data", "scale"]

_TIME_STEPS = 2**24  # integer steps over the largest possible stage time
_MEM_STEPS = 2**32  # integer steps over the memory limit (or the whole model's memory)
_MEM_RTOL = 1e-9  # the limit forgives this much float rounding, as the chain DP does


@dataclass(frozen=True)
class Data:
    """The instance as integers (see ``ilp``'s docstring for the symbols); x indexes the
    values that have consumers, in the order of ``CostModel.values``."""

    num_layers: int
    stages: int
    succ: tuple[tuple[int, ...], ...]
    lo: tuple[int, ...]  # stage(i) >= lo[i]: later stages need the ancestors of i
    hi: tuple[int, ...]  # stage(i) <= hi[i]: earlier stages cannot hold descendants of i
    gap: dict[tuple[int, int], int]  # edge -> most stages strictly between its ends
    work: tuple[tuple[int, ...], ...]  # W[k,i], time steps
    producer: tuple[int, ...]  # the layer u of value x
    consumers: tuple[tuple[int, ...], ...]  # the layers that read x
    comm: tuple[int, ...]  # C[x], time steps, one forward transfer of x
    grad: tuple[int, ...]  # G[x], time steps, its gradient back (0 without grad)
    area: tuple[tuple[int, ...], ...]  # A[k,i], byte steps
    stash: tuple[tuple[int, ...], ...]  # held_k * O[x], byte steps (recomputing stages only)
    tied: tuple[tuple[int, tuple[int, ...], int], ...]  # (owner, users, S[t] byte steps)
    limit: int | None  # byte steps; None: no memory rule
    unit_ms: float
    unit_bytes: float
    rounding_error_ms: float

    def fanout(self, x: int) -> int:
        """The most stages value x can be sent to."""
        return min(len(self.consumers[x]), self.stages - 1)


def scale(cm: CostModel, limit: float, memory_objective: bool = False) -> Data:
    """Scale the per-layer and per-value costs of ``cm`` to integers and derive the domain
    bounds."""
    prof, big_k, n = cm.profile, cm.stages, cm.profile.num_layers
    succ_l: list[list[int]] = [[] for _ in range(n)]
    has_pred = [False] * n
    for u, v in layer_edges(prof):
        succ_l[u].append(v)
        has_pred[v] = True
    succ = tuple(tuple(s) for s in succ_l)
    anc, desc = reach_counts(n, layer_edges(prof))
    lo = tuple(max(0, big_k - n + a) for a in anc)
    hi = tuple(min(big_k - 1, n - 1 - d) for d in desc)
    # Stages strictly between stage(u) and stage(v) of an edge u -> v can only hold layers that
    # are neither ancestors of u nor descendants of v: at most this many stages lie between.
    gap = {(u, v): n - 2 - anc[u] - desc[v] for u in range(n) for v in succ[u]}

    fwd, bwd, again = cm.layer_array("fwd_ms"), cm.backward_ms(), cm.layer_array("recompute_ms")
    inputs = cm.layer_array("in_bytes")
    terms, state = cm.activations(), cm.param_state_bytes()
    saved = terms.bound if terms.bound is not None else terms.act
    if terms.w is not None and cm.holding.splits:  # from I to W a layer may hold more: W's
        saved = np.maximum(saved, terms.w)  # (a micro-batch holds one of the two at a time)
    step = cm.step_bytes()  # the batch on the first layer's stage, the targets on the last's
    vals = [(x, val) for x, val in enumerate(cm.values.values) if val.consumers]
    size, ms = cm.value_bytes(), cm.value_transfer_ms()
    work_ms = [[float(fwd[i] + bwd[i] + (again[i] if cm.recomputes(k) else 0.0)) for i in range(n)]
               for k in range(big_k)]
    fanout = [min(len(val.consumers), big_k - 1) for _, val in vals]
    comm_ms = [float(ms[x]) if f else 0.0 for (x, _), f in zip(vals, fanout, strict=True)]
    grad_ms = [c if val.grad else 0.0 for c, (_, val) in zip(comm_ms, vals, strict=True)]
    top_ms = sum(max(w) for w in zip(*work_ms, strict=True)) + (
        sum(c * f for c, f in zip(comm_ms, fanout, strict=True))
        + sum(g * f for g, f in zip(grad_ms, fanout, strict=True)))
    unit_ms = top_ms / _TIME_STEPS if top_ms > 0 else 1.0
    work = tuple(tuple(round(w / unit_ms) for w in row) for row in work_ms)
    comm = tuple(round(c / unit_ms) for c in comm_ms)
    grad = tuple(c if val.grad else 0 for c, (_, val) in zip(comm, vals, strict=True))
    # a stage holds one of: x's reception (with its gradient) or up to fanout sends of x
    err = sum(max(abs(work_ms[k][i] - unit_ms * work[k][i]) for k in range(big_k))
              for i in range(n))
    err += sum(abs(c - unit_ms * q) * f for c, q, f in zip(comm_ms, comm, fanout, strict=True))

    area_b, stash_b = [], []
    fixed = [step[0] if i == 0 else 0.0 for i in range(n)]
    fixed[-1] += step[1]
    for k in range(big_k):
        held = cm.in_flight(k)
        if cm.recomputes(k):
            rebuilt = cm.rebuilt(k)
            area_b.append([float(state[i] + rebuilt * saved[i]) + fixed[i]
                           + (0.0 if has_pred[i] else held * float(inputs[i])) for i in range(n)])
            stash_b.append([held * float(size[x]) for x, _ in vals])
        else:
            area_b.append([float(state[i] + held * saved[i]) + fixed[i] for i in range(n)])
            stash_b.append([0.0] * len(vals))
    tied_b = [float(b) for b in cm.tied_state_bytes()]
    finite = math.isfinite(limit)
    if finite or memory_objective:
        scale_b = limit if finite else max(
            sum(max(col) for col in zip(*area_b, strict=True))
            + sum(max(col, default=0.0) for col in zip(*stash_b, strict=True)) + sum(tied_b), 1.0)
        unit_bytes = max(1.0, scale_b / _MEM_STEPS)
    else:
        unit_bytes = 1.0
    area = tuple(tuple(math.ceil(a / unit_bytes) for a in row) for row in area_b)
    stash = tuple(tuple(math.ceil(s / unit_bytes) for s in row) for row in stash_b)
    tied = tuple((tie.layers[0], tie.layers[1:], math.ceil(b / unit_bytes))
                 for tie, b in zip(prof.tied, tied_b, strict=True))
    limit_steps = (math.floor((limit + _MEM_RTOL * max(1.0, limit)) / unit_bytes) if finite
                   else None)
    return Data(n, big_k, succ, lo, hi, gap, work, tuple(val.producer for _, val in vals),
                tuple(val.consumers for _, val in vals), comm, grad, area, stash, tied,
                limit_steps, unit_ms, unit_bytes, err)
