"""Exact partition of a chain of L layers into K contiguous stages (min-max, memory-limited).

    >>> from partitioner import CostModel, load_profile
    >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=4, recompute="always")
    >>> sol = partition_chain(cm, memory_limit_bytes=80 * 2**30)
    >>> sol.boundaries                      # stage k holds layers [boundaries[k], boundaries[k+1])
    (0, 7, 14, 20, 26)

Stage k's time per micro-batch is  g(start) + P_k[end] - P_k[start] + t(end)  with P_k the
prefix sum of its layers' compute, t(c) the forward transfers of the values crossing the cut
before layer c and g(c) their gradients; its memory is the largest of  R_k[end] - E_k[start]
over the schedule's states (``cost.holding``: micro-batches before I, between I and W, being
rebuilt; prefix sums of state and activations, ``ActivationTerms.forms``), plus the copies of
tied parameters it holds (``_last_ends``: they keep the memory non-decreasing in the end).
Both are "a value of the end minus a value of the start", which is what makes an exact
parametric search fast:

  feasible(T): stage k may end at j iff some reachable start i < j with memory
               R_k[j] - E_k[i] <= limit has G_k[i] >= H_k[j] - T   (G = P - t, H = P + t).

For fixed i the memory rule holds for j in (i, J_i] (each R_k is non-decreasing; J_i is the
smallest over the states), so the best start
for every j is a maximum over the intervals that cover j: one vectorised pass per stage.
Bisection over T, each feasible answer tightened to the bottleneck it achieves, stops at a
relative gap of 1e-9: the result is optimal to that precision (tests check it against brute
force).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import numpy.typing as npt

from partitioner.cost.activations import ActivationTerms
from partitioner.cost.model import CostModel, FloatArray
from partitioner.cost.partition import Solution, stage_costs
from partitioner.solve.infeasible import InfeasibleError, explain_infeasible, too_many_stages

__all__ = ["chain_fits", "min_memory_cuts", "partition_chain"]

_RTOL = 1e-9  # bisection gap, relative to the bottleneck
_MEM_RTOL = 1e-9  # memory comparisons forgive this much rounding of prefix sums

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class _StageArrays:
    """Prefix arrays of one stage variant (index c = cut before layer c, c = 0..L)."""

    head: FloatArray  # H[j]: objective value contributed by the end cut
    tail: FloatArray  # G[i]: objective value subtracted at the start cut
    last_end: IntArray  # J[i]: the furthest end j whose memory fits with start i (< i+1: none)

    @cached_property
    def writes(self) -> tuple[IntArray, IntArray]:
        """Start i may end its stage anywhere in [i+1, J[i]]: that interval as two blocks of
        2**level points, one from i+1 and one ending at J[i], each written to the flat index
        level * n + first point; the writes' targets and starts i, sorted by (target, G) for
        ``_cover_max`` (made on first use: the dense solve does without them)."""
        n, last_end = len(self.head), self.last_end
        starts = np.flatnonzero(last_end > np.arange(n))
        level = np.floor(np.log2(last_end[starts] - starts)).astype(np.int64)
        targets = np.concatenate([level * n + starts + 1,
                                  level * n + last_end[starts] - (1 << level) + 1])
        owners = np.concatenate([starts, starts])
        order = np.lexsort((self.tail[owners], targets))
        return targets[order], owners[order]


def _prefix(x: FloatArray) -> FloatArray:
    return np.concatenate(([0.0], np.cumsum(x)))


class _Forms:
    """What every stage variant of one search shares, made once per recompute flag: the
    state's prefix sums, the activations' forms (``ActivationTerms.forms``), the objective's
    (H, G) arrays."""

    def __init__(self, cm: CostModel, memory_objective: bool) -> None:
        self.cm, self.memory_objective = cm, memory_objective
        self.state = _prefix(cm.param_state_bytes())
        self.inputs, self.targets = cm.step_bytes()  # the first stage holds these, the last those
        self._made: dict[bool, tuple[tuple[tuple[FloatArray, FloatArray], ...],
                                     tuple[FloatArray, FloatArray]]] = {}

    def of(self, recompute: bool) -> tuple[tuple[tuple[FloatArray, FloatArray], ...],
                                           tuple[FloatArray, FloatArray]]:
        """(the forms of held, held_for_w, rebuilt; (H, G) of the time objective)."""
        made = self._made.get(recompute)
        if made is None:
            cm = self.cm
            fwd, bwd = cm.layer_array("fwd_ms"), cm.backward_ms()
            work = _prefix(fwd + bwd + (cm.layer_array("recompute_ms") if recompute else 0.0))
            made = self._made[recompute] = (cm.activations().forms(recompute),
                                            (work + cm.cut_send_ms(), work - cm.cut_grad_ms()))
        return made

    def memory(self, recompute: bool, states: Sequence[tuple[int, int, int]]
               ) -> tuple[FloatArray, FloatArray]:
        """(R, E), one row per state of ``states`` (``cost.holding``): a stage [i, j) holds
        R[j] - E[i] in that state (``ActivationTerms.forms``), its memory the largest over
        them; E[L] is inf (no stage starts at L)."""
        (held, w, rebuilt), _ = self.of(recompute)
        a, b, t = (np.array(col, dtype=np.float64)[:, None] for col in zip(*states, strict=True))
        mem_end = self.state + a * held[0] + b * w[0] + t * rebuilt[0]
        mem_start = self.state[:-1] + a * held[1] + b * w[1] + t * rebuilt[1]
        mem_start[:, 0] -= self.inputs
        mem_end[:, -1] += self.targets
        ends: FloatArray = np.hstack([mem_start, np.full((len(states), 1), math.inf)])
        return mem_end, ends

    def objective(self, recompute: bool, states: tuple[tuple[int, int, int], ...]
                  ) -> tuple[FloatArray, FloatArray]:
        """(H, G) for a stage holding micro-batches as ``states`` say; with
        ``memory_objective`` the memory of the state that holds the most on the whole chain
        (the others only bound it: a good split, not always the best)."""
        if self.memory_objective:
            mem_end, ends = self.memory(recompute, states)
            top = int(np.argmax(mem_end[:, -1] - ends[:, 0]))
            return mem_end[top], ends[top]
        return self.of(recompute)[1]


#: Per ``ActivationTerms`` (one micro-batch size of one profile, which ``CostModel.like``
#: shares across a search's configurations): the furthest-end arrays of the stage variants
#: made so far, by all else they depend on. A search asks for the same variant many times
#: (1F1B's stage k holds K - k micro-batches whatever M >= K - k).
_MEMOS: dict[int, tuple[weakref.ref[ActivationTerms], dict[tuple[object, ...], IntArray]]] = {}


def _memo_of(cm: CostModel) -> dict[tuple[object, ...], IntArray]:
    terms = cm.activations()
    got = _MEMOS.get(id(terms))
    if got is not None and got[0]() is terms:
        return got[1]
    memo: dict[tuple[object, ...], IntArray] = {}
    ident = id(terms)
    _MEMOS[ident] = (weakref.ref(terms, lambda _: _MEMOS.pop(ident, None)), memo)
    return memo


def _variant_last_ends(cm: CostModel, shared: _Forms,
                       variants: Sequence[tuple[bool, tuple[tuple[int, int, int], ...]]],
                       limit: float, tol: float
                       ) -> dict[tuple[bool, tuple[tuple[int, int, int], ...]], IntArray]:
    """J for each (recompute, states) variant: the smallest over its states of the furthest
    end whose memory fits ``limit`` (+ ``tol``); made for all missing variants' states at once
    (one row per distinct state) and remembered (``_MEMOS``)."""
    memo = _memo_of(cm)
    base = (cm.optimizer, cm.replicas if cm.shard_optimizer else 1, *cm.step_bytes(), limit,
            tol)
    out = {key: memo[(*base, *key)] for key in variants if (*base, *key) in memo}
    for rc in (False, True):
        missing = [key for key in variants if key[0] == rc and key not in out]
        if not missing:
            continue
        states = list(dict.fromkeys(s for _, group in missing for s in group))
        mem_end, ends = shared.memory(rc, states)
        caps = ends + limit + tol
        row = {s: _last_ends(cm, mem_end[j], caps[j]) for j, s in enumerate(states)}
        for key in missing:
            last_end = np.full(cm.profile.num_layers + 1, cm.profile.num_layers, dtype=np.int64)
            for s in key[1]:
                last_end = np.minimum(last_end, row[s])
            out[key] = memo[(*base, *key)] = last_end
    return out


def _last_ends(cm: CostModel, mem_end: FloatArray, cap: FloatArray) -> IntArray:
    """J[i]: the furthest end j with R[j] + ties(i, j) <= cap[i] (cap = E[i] + limit).

    ties(i, j) is the state of the tied copies a stage [i, j) holds: tied parameter t counts
    when its owner o_t lies before i and a user lies in [i, j), i.e. from j > n_t(i), the first
    user at or after i. So for fixed i the memory still only grows with j (the feasible ends
    stay an interval and the search stays exact); the steps are taken in increasing order."""
    last = np.searchsorted(mem_end, cap, side="right") - 1
    ties = cm.profile.tied
    if not ties:
        return last
    n = cm.profile.num_layers
    starts = np.arange(n + 1)
    steps, sizes = [], []
    for t, tie in enumerate(ties):
        users = np.array(tie.layers[1:], dtype=np.int64)
        at = np.searchsorted(users, starts)  # the first user at or after i
        nxt = np.where(at < len(users), users[np.minimum(at, len(users) - 1)], n + 1)
        steps.append(np.where(starts > tie.layers[0], nxt + 1, n + 2))  # ends >= it pay
        sizes.append(np.full(n + 1, cm.tied_state_bytes()[t]))
    step_at, size_at = np.array(steps), np.array(sizes)
    order = np.argsort(step_at, axis=0, kind="stable")
    step_at = np.take_along_axis(step_at, order, axis=0)
    paid = np.cumsum(np.take_along_axis(size_at, order, axis=0), axis=0)
    for row in range(len(ties)):  # tied copy `row` (in step order) joins the stage from its step
        hit = last >= step_at[row]
        tighter = np.searchsorted(mem_end, cap - paid[row], side="right") - 1
        last = np.where(hit, np.maximum(step_at[row] - 1, tighter), last)
    out: IntArray = last
    return out


def _cover_max(arr: _StageArrays, allowed: BoolArray) -> FloatArray:
    """For every cut j, the largest G[i] over the allowed starts i whose interval [i+1, J[i]]
    holds j (-inf where none does).

    Each interval is written as two overlapping blocks of 2**level points (one from i+1, one
    ending at J[i]); every level's blocks are then pushed down to their halves: O(n log n),
    vectorised, over the window of cuts that the allowed intervals reach. The writes are
    pre-sorted by (target block, G), so the last write of each block carries its maximum."""
    n = len(arr.head)
    best = np.full(n, -math.inf)
    write_target, write_start = arr.writes
    keep = allowed[write_start]
    targets, starts = write_target[keep], write_start[keep]
    if len(targets) == 0:
        return best
    first = int(starts.min()) + 1
    width = int(arr.last_end[starts].max()) + 1 - first
    last = np.append(targets[1:] != targets[:-1], True)
    targets, values = targets[last], arr.tail[starts[last]]
    level = targets // n
    top = int(level.max())  # every block fits in the window: 2**top <= width
    tables = np.full((top + 1, width), -math.inf)
    tables[level, targets - level * n - first] = values  # targets are unique now
    for lvl in range(top, 0, -1):
        half = 1 << (lvl - 1)
        up, down = tables[lvl], tables[lvl - 1]
        np.maximum(down, up, out=down)
        np.maximum(down[half:], up[: width - half], out=down[half:])
    best[first: first + width] = tables[0]
    return best


class _Search:
    """Feasibility of a bottleneck T for a fixed (cost model, K, limit); see module docstring."""

    def __init__(self, cm: CostModel, limit: float, memory_objective: bool) -> None:
        self.num_layers, self.stages = cm.profile.num_layers, cm.stages
        # Every stage costs at least its layers' fwd + bwd: a lower bound for the bisection.
        work = cm.layer_array("fwd_ms") + cm.backward_ms()
        self.lower_bound = 0.0 if memory_objective else max(work.sum() / cm.stages, work.max())
        tol = _MEM_RTOL * max(1.0, abs(limit)) if math.isfinite(limit) else 0.0
        shared = _Forms(cm, memory_objective)
        free = math.isinf(limit) and not memory_objective  # no memory rule to state
        self.limited = not free
        # (without a limit the memory arrays go unused: no schedule is generated to count
        # what the stage holds)
        keys = [(cm.recomputes(k), () if free else cm.holding.states[k])
                for k in range(self.stages)]
        variants = list(dict.fromkeys(keys))
        if free:
            everywhere = np.full(self.num_layers + 1, self.num_layers, dtype=np.int64)
            ends = dict.fromkeys(variants, everywhere)
        else:
            ends = _variant_last_ends(cm, shared, variants, limit, tol)
        made: dict[tuple[bool, tuple[tuple[int, int, int], ...]], _StageArrays] = {}
        for key in variants:
            head, tail = shared.objective(*key)
            made[key] = _StageArrays(head, tail, ends[key])
        self.arrays = [made[key] for key in keys]
        self.after = np.arange(1, self.num_layers + 1)  # the cuts 1..L

    def reach(self, bound: float) -> list[BoolArray] | None:
        """reach[k][j]: layers [0, j) split into k+1 stages, each within bound and memory."""
        n, big_k = self.num_layers + 1, self.stages
        prev = np.zeros(n, dtype=bool)
        prev[0] = True
        out = []
        for k, arr in enumerate(self.arrays):
            if k == big_k - 1:  # the last stage only needs to end at L
                i = np.flatnonzero(prev & (arr.last_end >= n - 1))
                ok = bool(np.any(arr.tail[i] >= arr.head[n - 1] - bound))
                cur = np.zeros(n, dtype=bool)
                cur[n - 1] = ok
            elif math.isinf(bound):  # any end that some reachable start's memory allows
                furthest = np.maximum.accumulate(np.where(prev, arr.last_end, -1))
                cur = np.zeros(n, dtype=bool)
                cur[1:] = furthest[:-1] >= self.after
            else:
                best = _cover_max(arr, prev)
                cur = (best > -math.inf) & (best >= arr.head - bound)
            cur[: k + 1] = False
            cur[n - (big_k - 1 - k):] = False  # leave a layer for each later stage
            if not cur.any():
                return None
            out.append(cur)
            prev = cur
        return out if out[-1][-1] else None

    def trace_back(self, reach: list[BoolArray], bound: float) -> list[int]:
        """Cut points of one partition that ``reach`` proves exists."""
        cuts = [self.num_layers]
        for k in range(self.stages - 1, -1, -1):
            arr, end = self.arrays[k], cuts[-1]
            if k == 0:
                cuts.append(0)
                break
            ok = reach[k - 1][:end] & (arr.last_end[:end] >= end)
            ok &= arr.tail[:end] >= arr.head[end] - bound
            cuts.append(int(np.flatnonzero(ok)[-1]))
        return cuts[::-1]

    def bottleneck(self, cuts: list[int]) -> float:
        return max(float(self.arrays[k].head[cuts[k + 1]] - self.arrays[k].tail[cuts[k]])
                   for k in range(self.stages))

    def solve(self) -> list[int] | None:
        """Cut points minimising the bottleneck (to a relative 1e-9), or None if none fits."""
        if (self.num_layers + 1) ** 2 * self.stages <= _DENSE_MAX:
            if self.limited and self.reach(math.inf) is None:
                return None  # nothing fits: proven in O(K L), before the O(K L^2) recurrence
            return self.solve_dense()
        reach = self.reach(math.inf)
        if reach is None:
            return None
        best = self.trace_back(reach, math.inf)
        hi = self.bottleneck(best)
        lo = min(self.lower_bound, hi)
        while hi - lo > _RTOL * max(abs(hi), 1e-30):
            mid = 0.5 * (lo + hi)
            reach = self.reach(mid)
            if reach is None:
                lo = mid
            else:
                best = self.trace_back(reach, mid)
                hi = self.bottleneck(best)
        return best

    def solve_dense(self) -> list[int] | None:
        """``solve`` exactly, by the textbook min-max recurrence over every (start, end) pair:
        best[k][j] = min over i of max(best[k-1][i], cost_k(i, j)), O(K L^2) in K vectorised
        steps, which for a few hundred layers is faster than the bisection's many passes. The
        cuts are traced back as ``trace_back`` picks them (each stage's latest start)."""
        n = self.num_layers + 1
        cuts = np.arange(n)
        costs: dict[int, FloatArray] = {}  # per stage variant: cost[i, j] of the stage [i, j)
        for arr in self.arrays:
            if id(arr) not in costs:
                fits = (cuts[None, :] > cuts[:, None]) & (cuts[None, :] <= arr.last_end[:, None])
                costs[id(arr)] = np.where(fits, arr.head[None, :] - arr.tail[:, None], math.inf)
        best = [costs[id(self.arrays[0])][0]]
        for arr in self.arrays[1:]:
            best.append(np.maximum(best[-1][:, None], costs[id(arr)]).min(axis=0))
        bound = float(best[-1][-1])
        if not math.isfinite(bound):
            return None
        out = [self.num_layers]
        for k in range(self.stages - 1, 0, -1):
            end = out[-1]
            ok = (best[k - 1][:end] <= bound) & (costs[id(self.arrays[k])][:end, end] <= bound)
            out.append(int(np.flatnonzero(ok)[-1]))
        return [0, *out[::-1]]


#: Largest (L + 1)^2 x K that ``_Search.solve_dense`` takes on: below it, measured on this
#: project's machine, it is 3-40x faster than the bisection (L = 27..300, K = 4..26); its
#: arrays, (L + 1)^2 x 8 bytes per stage variant, stay under 16 MB.
_DENSE_MAX = 2_000_000


def chain_fits(cm: CostModel, limit: float) -> bool:
    """Whether some split of the layer order into ``cm.stages`` stages fits ``limit``."""
    return _Search(cm, limit, memory_objective=False).reach(math.inf) is not None


def partition_chain(cm: CostModel, memory_limit_bytes: float = math.inf,
                    explain: bool = True) -> Solution:
    """The partition of ``cm.profile``'s layers into ``cm.stages`` contiguous, non-empty stages
    with the smallest bottleneck (compute + communication per micro-batch) whose stages each
    fit ``memory_limit_bytes`` (status ``exact``). Raises ``InfeasibleError`` saying what
    would fit (``explain`` False: only that nothing does, for a caller that moves on)."""
    if cm.stages > cm.profile.num_layers:
        raise InfeasibleError(too_many_stages(cm))
    start = time.perf_counter()
    cuts = _Search(cm, memory_limit_bytes, memory_objective=False).solve()
    if cuts is None and not explain:
        raise InfeasibleError(f"no partition into K={cm.stages} stages fits the memory limit")
    if cuts is None:
        need = max(stage_costs(cm, min_memory_cuts(cm)).stage_memory_bytes)
        raise InfeasibleError(explain_infeasible(
            cm, memory_limit_bytes, f"partition of the {cm.profile.num_layers} layers", need,
            fits=lambda other: chain_fits(other, memory_limit_bytes)))
    sol = stage_costs(cm, cuts)
    return replace(sol, status="exact", lower_bound_ms=sol.bottleneck_ms,
                   solve_s=time.perf_counter() - start)


def min_memory_cuts(cm: CostModel) -> list[int]:
    """Cut points minimising the largest stage memory (no time objective; tied copies are not
    part of this objective, so with ``tied`` it is a good split, not always the best)."""
    cuts = _Search(cm, math.inf, memory_objective=True).solve()
    assert cuts is not None  # without a limit every partition is feasible
    return cuts
