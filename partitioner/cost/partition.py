"""A partition of the layers into stages, and what each stage costs under a cost model.

    >>> from partitioner import CostModel, load_profile
    >>> cm = CostModel(load_profile("pipedream/resnet18"), 4, 4, stages=2)
    >>> sol = evaluate_assignment(cm, [0] * 35 + [1] * 35)
    >>> [len(n) for n in sol.nodes], round(sol.bottleneck_ms, 1), sol.is_ranges
    ([35, 35], 189.4, True)

One ``Solution`` type for every partitioner: the chain DP's cut points and the CP-SAT
model's convex node sets are both stages of layers, with the same per-stage figures and a
``status`` saying how good the partition is known to be.

Costs per micro-batch, the chain cost model of ``CostModel`` extended edge by edge:

- compute of stage k: sum over its layers of fwd + bwd (+ fwd again when k recomputes; bwd is
  I + W when the schedule splits the backward);
- communication, value by value (``formats.values``: a layer's whole output, or each of the
  ``outputs`` it lists): a value x of layer u whose consumers lie in D(x) = {their stages}
  minus u's own stage goes once to each destination stage (point to point, also when it is
  several stages ahead), each ``link.transfer_ms(bytes[x])``: the sender pays every forward
  transfer and each receiving stage pays one gradient transfer back when x has ``grad``;
- memory: training state + activations; a stage that uses a tied parameter whose owner layer
  is in another stage holds a copy (its training state); a recomputing stage stashes, per
  micro-batch in flight, every value it receives (once per value) plus the ``in_bytes`` of
  its layers that have no predecessor (the model's inputs), with its saved activations on top
  while rebuilt, from I until W when split; the peak is the largest over the schedule's
  states (``cost.holding``); a chain profile that says what its layers share takes
  ``CostModel.activations``' exact terms instead (as ``stage_memory_bytes`` does).

On a chain whose ``in_bytes[i] == out_bytes[i-1]`` (as the profilers write them) these are
exactly ``CostModel.stage_compute_ms + stage_comm_ms`` and ``stage_memory_bytes``, which
``stage_costs`` evaluates straight from the cost model's prefix sums.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

import numpy as np
import numpy.typing as npt

from partitioner.cost.holding import holding
from partitioner.cost.model import CostModel, FloatArray
from partitioner.formats.layers import assignment_problems, layer_edges, stage_of_nodes
from partitioner.schedule.recompute import recomputes

__all__ = ["STATUSES", "Solution", "evaluate_assignment", "recost", "stage_costs",
           "tied_copies"]

#: How a solution's stages were found, and so how good they are known to be.
STATUSES = {
    "exact": "the chain DP: the best split of the layer order (equal to brute force)",
    "optimal": "CP-SAT: proven the best convex partition of the layer graph",
    "feasible": "CP-SAT stopped at its time limit: within the proven gap of the best",
    "layer order": "the chain DP on a graph profile: the best split of the layer order, "
                   "costed on the graph",
    "evaluated": "given, not searched: its costs only",
}


@dataclass(frozen=True)
class Solution:
    """Stages of layers with their per-stage figures (per micro-batch of the largest size).

    ``status`` is one of ``STATUSES``; for ``optimal`` and ``feasible`` ``lower_bound_ms`` is a
    proven lower bound on the best bottleneck, already net of ``rounding_error_ms`` (the bound
    on what the ILP's integer scaling of times can change a stage's time by).
    """

    nodes: tuple[tuple[int, ...], ...]  # stage k's layers, sorted
    stage_compute_ms: tuple[float, ...]
    stage_comm_ms: tuple[float, ...]
    stage_memory_bytes: tuple[float, ...]
    stage_sent_bytes: tuple[float, ...]  # bytes stage k sends forward, summed over destinations
    status: str = "evaluated"
    lower_bound_ms: float = 0.0
    rounding_error_ms: float = 0.0
    time_limit_s: float | None = None
    solve_s: float = 0.0

    @property
    def stages(self) -> int:
        return len(self.nodes)

    @property
    def stage_ms(self) -> tuple[float, ...]:
        """Compute + communication of each stage, per micro-batch."""
        return tuple(c + m for c, m in zip(self.stage_compute_ms, self.stage_comm_ms,
                                           strict=True))

    @property
    def bottleneck_ms(self) -> float:
        return max(self.stage_ms)

    @property
    def gap(self) -> float:
        """Relative distance to the proven lower bound: 0 when optimal (up to rounding)."""
        if self.status in ("exact", "optimal"):
            return 0.0
        top = self.bottleneck_ms
        return max(0.0, top - self.lower_bound_ms) / top if top > 0 else 0.0

    @property
    def quality(self) -> str:
        """``exact``, ``optimal``, ``gap 0.12%``, ``layer order`` or ``evaluated``."""
        return f"gap {100 * self.gap:.2f}%" if self.status == "feasible" else self.status

    @property
    def stage_of(self) -> tuple[int, ...]:
        return stage_of_nodes(self.nodes)

    @cached_property
    def is_ranges(self) -> bool:
        """Whether the stages are contiguous layer ranges, in order: a chain split."""
        expect = 0
        for nodes in self.nodes:
            if nodes[0] != expect or nodes[-1] - nodes[0] + 1 != len(nodes):
                return False
            expect = nodes[-1] + 1
        return True

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Cut points (0, end_0, ..., L) of a chain split; ValueError for other partitions."""
        if not self.is_ranges:
            raise ValueError("the stages are not contiguous layer ranges, so they have no cut "
                             "points; use .nodes")
        return (0, *(n[-1] + 1 for n in self.nodes))


def stage_costs(cm: CostModel, cuts: Sequence[int]) -> Solution:
    """The chain split with cut points ``cuts`` (0, end_0, ..., L), costed by the cost model's
    chain rules (``stage_compute_ms``, ``stage_comm_ms``, ``stage_memory_bytes``; exact for a
    profile without edges) for every stage at once: each per-layer sum is a difference of
    prefix sums (made once per array, ``_derived``), so a split costs O(K) array work however
    many layers it has (a search costs thousands of splits)."""
    at = np.asarray(cuts, dtype=np.int64)
    start, end = at[:-1], at[1:]
    big_k, n = len(start), cm.profile.num_layers
    rc = _recomputing(cm.recompute, big_k)

    def span(layer_values: FloatArray) -> FloatArray:
        prefix = _derived(layer_values, "prefix", _prefix_sums)
        out: FloatArray = prefix[end] - prefix[start]
        return out

    again = np.where(rc, span(cm.layer_array("recompute_ms")), 0.0)
    compute = (span(cm.layer_array("fwd_ms")) + span(cm.backward_ms()) + again
               + cm.compute_actions * cm.runtime.action_ms)
    comm = cm.cut_grad_ms()[start] + cm.cut_send_ms()[end]
    state = span(cm.param_state_bytes())
    if cm.profile.tied:
        state += [cm.range_tied_bytes(int(a), int(b)) for a, b in zip(start, end, strict=True)]
    terms = cm.activations()
    shares = []  # per form (held, held_for_w, rebuilt): each stage's bytes, recomputing or not
    for with_rc, without in zip(terms.forms(True), terms.forms(False), strict=True):
        shares.append(np.where(rc, with_rc[0][end] - with_rc[1][start],
                               without[0][end] - without[1][start]))
    held, held_w, rebuilt = shares  # (forms(False)'s rebuilt is 0: nothing is rebuilt)
    inputs, targets = cm.step_bytes()
    mem = state + np.where(start == 0, inputs, 0.0) + np.where(end == n, targets, 0.0)
    a, b, t = _state_counts(cm.schedule, big_k, cm.microbatches, cm.stages_per_rank)
    # each stage's largest a held + b held_for_w + t rebuilt over its states (padded with
    # repeats of its first), as ``Holding.activation_bytes`` adds them
    mem += (a * held[:, None] + b * held_w[:, None] + t * rebuilt[:, None]).max(axis=1)
    out_bytes = _derived(cm.value_bytes(), "by_producer", lambda size: np.bincount(
        cm.values.producer, size, minlength=n).astype(np.float64))
    sent = [*out_bytes[end[:-1] - 1].tolist(), 0.0]
    nodes = tuple(tuple(range(a, b)) for a, b in zip(start.tolist(), end.tolist(), strict=True))
    return Solution(nodes, tuple(compute.tolist()), tuple(comm.tolist()), tuple(mem.tolist()),
                    tuple(sent))


#: Arrays derived from read-only per-layer arrays (their prefix sums, ...), by the array's
#: identity and what was derived; each entry keeps its array alive, so an id is not reused
#: while it is here (``like`` shares the per-layer arrays across a search's configurations).
_DERIVED: OrderedDict[tuple[int, str], tuple[FloatArray, FloatArray]] = OrderedDict()
_DERIVED_MAX = 256


def _derived(values: FloatArray, what: str, make: Callable[[FloatArray], FloatArray]
             ) -> FloatArray:
    if values.flags.writeable:  # may change: not remembered
        return make(values)
    key = (id(values), what)
    got = _DERIVED.get(key)
    if got is not None and got[0] is values:
        _DERIVED.move_to_end(key)
        return got[1]
    out = make(values)
    out.setflags(write=False)
    _DERIVED[key] = (values, out)
    if len(_DERIVED) > _DERIVED_MAX:
        _DERIVED.popitem(last=False)
    return out


def _prefix_sums(values: FloatArray) -> FloatArray:
    out: FloatArray = np.concatenate(([0.0], np.cumsum(values)))
    return out


@lru_cache(maxsize=512)
def _recomputing(mode: str, stages: int) -> npt.NDArray[np.bool_]:
    """Which of K stages recompute under ``mode`` (``schedule.recompute``)."""
    out = np.array([recomputes(mode, k, stages) for k in range(stages)], dtype=bool)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=4096)  # a search's (schedule, K, M, V): a few thousand
def _state_counts(name: str, stages: int, microbatches: int, stages_per_rank: int
                  ) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``holding``'s states as three (K, S) arrays of counts (before I, between I and W,
    rebuilding), a stage with fewer than S states padded with its first."""
    states = holding(name, stages, microbatches, stages_per_rank).states
    width = max(len(s) for s in states)
    padded = [[*s, *(s[0],) * (width - len(s))] for s in states]
    grid = np.array(padded, dtype=np.float64).reshape(stages, width, 3)
    cols = tuple(np.ascontiguousarray(grid[:, :, j]) for j in range(3))
    for col in cols:
        col.setflags(write=False)
    return cols[0], cols[1], cols[2]


def recost(cm: CostModel, sol: Solution) -> Solution:
    """The same stages' figures under ``cm`` (another M, or the graph's costs of a chain
    split); the status, bound and solve time stay the solution's."""
    if cm.profile.edges is None and sol.is_ranges:
        new = stage_costs(cm, sol.boundaries)
    else:
        new = evaluate_assignment(cm, sol.stage_of)
    return replace(new, status=sol.status, lower_bound_ms=sol.lower_bound_ms,
                   rounding_error_ms=sol.rounding_error_ms, time_limit_s=sol.time_limit_s,
                   solve_s=sol.solve_s)


def tied_copies(cm: CostModel, stage_of: Sequence[int], stages: int) -> FloatArray:
    """Per stage, the training state of the tied parameters' copies it holds: a stage that
    holds a layer using a tied parameter, but not its owner (the first listed layer).

        >>> from partitioner.formats.profile import TiedParam
        >>> from partitioner import load_profile
        >>> prof = replace(load_profile("h200/gpt2-medium"), tied=(TiedParam("w", 100, (0, 25)),))
        >>> tied_copies(CostModel(prof, 16, 4, optimizer="none"), [0] * 13 + [1] * 13, 2).tolist()
        [0.0, 200.0]
    """
    out = np.zeros(stages)
    state = cm.tied_state_bytes()
    for t, tie in enumerate(cm.profile.tied):
        for k in {stage_of[i] for i in tie.layers} - {stage_of[tie.layers[0]]}:
            out[k] += state[t]
    return out


def evaluate_assignment(cm: CostModel, stage_of: Sequence[int]) -> Solution:
    """The per-stage compute, communication and memory of an assignment (``stage_of[i]`` =
    stage of layer i, K = ``cm.stages``), straight from the cost model's per-layer arrays.
    Raises ValueError listing every problem unless the assignment is a convex partition."""
    prof, big_k = cm.profile, cm.stages
    edges = layer_edges(prof)
    problems = assignment_problems(prof.num_layers, edges, stage_of, big_k)
    if problems:
        raise ValueError("not a convex partition into K=" + str(big_k) + " stages:\n  "
                         + "\n  ".join(problems))
    fwd, bwd, again = cm.layer_array("fwd_ms"), cm.backward_ms(), cm.layer_array("recompute_ms")
    saved, inputs = cm.activations().act, cm.layer_array("in_bytes")  # (+ the loss's)
    state = cm.param_state_bytes()
    vals, size, ms = cm.values, cm.value_bytes(), cm.value_transfer_ms()
    compute = [cm.compute_actions * cm.runtime.action_ms] * big_k  # each action's fixed cost
    comm = [0.0] * big_k
    state_k, saved_k, stash_k, sent_k = [0.0] * big_k, [0.0] * big_k, [0.0] * big_k, [0.0] * big_k
    for i, k in enumerate(stage_of):
        compute[k] += float(fwd[i] + bwd[i]) + (float(again[i]) if cm.recomputes(k) else 0.0)
        state_k[k] += float(state[i])
        saved_k[k] += float(saved[i])
    if prof.tied:
        state_k = [a + float(b) for a, b in zip(state_k, tied_copies(cm, stage_of, big_k),
                                                 strict=True)]
    destinations: dict[int, set[int]] = {}  # value x -> the other stages that read it
    has_pred = [False] * prof.num_layers
    for (u, v), xs in zip(edges, vals.edge_reads, strict=True):
        has_pred[v] = True
        if stage_of[v] != stage_of[u]:
            for x in xs:
                destinations.setdefault(x, set()).add(stage_of[v])
    for i, k in enumerate(stage_of):
        if not has_pred[i]:
            stash_k[k] += float(inputs[i])
    for x, dests in destinations.items():
        src, transfer, n_bytes = stage_of[vals.values[x].producer], float(ms[x]), float(size[x])
        for d in dests:
            comm[src] += transfer  # the forward send
            if vals.values[x].grad:
                comm[d] += transfer  # the gradient sent back
            sent_k[src] += n_bytes
            stash_k[d] += n_bytes
    nodes = tuple(tuple(i for i, s in enumerate(stage_of) if s == k) for k in range(big_k))
    terms, step = cm.activations(), cm.step_bytes()
    memory = []
    for k in range(big_k):
        rc = cm.recomputes(k)
        if terms.exact:  # a chain: stage k is the range of its nodes (cost.activations)
            start, end = nodes[k][0], nodes[k][-1] + 1
            acts = cm.stage_activation_bytes(start, end, k) + (
                step[0] if start == 0 else 0.0) + (step[1] if end == prof.num_layers else 0.0)
        else:  # from I to W: what the layers say W keeps, summed; or the graph until W
            held, rebuilt = (stash_k[k], saved_k[k]) if rc else (saved_k[k], 0.0)
            held_w = (held + rebuilt if terms.w is None
                      else float(terms.w[list(nodes[k])].sum()))
            acts = cm.holding.activation_bytes(k, held, held_w, rebuilt) + (
                step[1] if k == big_k - 1 else 0.0)  # the targets, where the loss is
        memory.append(state_k[k] + acts)
    return Solution(nodes, tuple(compute), tuple(comm), tuple(memory), tuple(sent_k))
