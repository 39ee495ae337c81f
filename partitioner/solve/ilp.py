"""CP-SAT partition of a layer DAG into K convex stages: minimum bottleneck under a memory limit.

    >>> from partitioner import CostModel, load_profile, partition_chain
    >>> cm = CostModel(load_profile("pipedream/resnet18"), 4, 4, stages=8)
    >>> sol = partition_graph(cm, time_limit_s=20)  # beats every split of the layer order:
    >>> sol.status, round(sol.bottleneck_ms, 2), round(partition_chain(cm).bottleneck_ms, 2)
    ('optimal', 35.21, 37.24)

The model, with i, u, v layers (0..L-1, in a topological order), k, j stages (0..K-1), E the
edges, succ(u) the successors of u, x a value (``formats.values``: produced by p(x), read by
the layers cons(x)), t a tied parameter (owner o(t), users U(t)), and the costs of
``cost.partition`` scaled to integers (``ilp_data``):

    y[i,k]  = 1  iff  stage(i) >= k                  (k = 1..K-1; y[i,0] = 1, y[i,K] = 0)
    x(i,k)  = y[i,k] - y[i,k+1] = 1  iff  layer i is in stage k   (an expression, not a var)
    r[x,k]  = 1  iff  stage k receives value x       (p(x) outside k, some v in cons(x) inside k)
    n[x,j] >= the number of stages x is sent to, if p(x) is in stage j (else >= 0)
    h[t,k]  = 1  iff  stage k holds a copy of t      (some user of t in k, its owner not)
    T       = the bottleneck: the largest stage time (compute + communication)

    minimise T  subject to, for every stage k:
      T >= sum_i W[k,i] x(i,k) + sum_x (G[x] r[x,k] + C[x] n[x,k])         (stage time)
      sum_i A[k,i] x(i,k) + held_k sum_x O[x] r[x,k] + sum_t S[t] h[t,k] <= limit   (memory)

C[x] is one forward transfer of x, G[x] its gradient back (0 when x has no gradient); edges
that carry nothing (ordering only) still make the stages convex.

Times are integers in steps of ``unit_ms`` = (the largest possible stage time) / 2**24, each
coefficient rounded to the nearest step; a stage's time is then off by at most the sum of the
rounding errors of the terms it can hold, ``rounding_error_ms`` in the result (at most half a
step per layer and per send: parts per million of the model's total time), and the reported
lower bound is net of it. Bytes are integers in
steps of ``unit_bytes`` >= 1 (limit / 2**32), terms rounded up and the limit down: the
memory rule is never loosened, only tightened by at most one step per term.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

from ortools.sat.python import cp_model

from partitioner.cost.model import CostModel
from partitioner.cost.partition import Solution, evaluate_assignment
from partitioner.solve.chain import partition_chain
from partitioner.solve.ilp_data import Data, scale
from partitioner.solve.infeasible import InfeasibleError, explain_infeasible, too_many_stages

__all__ = ["SolveTimeoutError", "min_memory_graph", "partition_graph"]

_MEM_RTOL = 1e-9  # the limit forgives this much float rounding, as the chain DP does


class SolveTimeoutError(ValueError):
    """The time limit ran out before CP-SAT found any partition; the message says what to do."""


class _Model:
    """The CP-SAT model of the module docstring, built block by block."""

    def __init__(self, d: Data, memory_objective: bool, chain_order: bool) -> None:
        self.d, self.m = d, cp_model.CpModel()
        big_k, n, m = d.stages, d.num_layers, self.m

        # -- variables ------------------------------------------------------------------------
        # y[i][k] for k = 0..K: stage(i) >= k; constants where the domain bounds decide it.
        self.y: list[list[Any]] = []
        for i in range(n):
            row: list[Any] = []
            for k in range(big_k + 1):
                if k <= d.lo[i]:
                    row.append(1)
                elif k > d.hi[i]:
                    row.append(0)
                else:
                    row.append(m.new_bool_var(f"y[{i},{k}]"))
            self.y.append(row)
        # r[x][k]: stage k receives value x (only where it costs time or memory), and
        # n[x][j]: destinations of x when its producer u is in stage j (only where sending
        # costs time; a bool when x has one consumer). When x's one consumer v can skip no
        # stage (gap 0, e.g. every edge of a chain), both are exact expressions of y instead:
        # r[x,k] = y[v,k] - y[u,k] = [stage(u) < k <= stage(v)], n[x,j] = r[x,j+1].
        self.r: dict[tuple[int, int], Any] = {}
        self.n: dict[tuple[int, int], Any] = {}
        self.exact: set[int] = set()  # the x whose r and n are expressions
        memory_matters = d.limit is not None or memory_objective
        for x, (u, cons) in enumerate(zip(d.producer, d.consumers, strict=True)):
            v0 = cons[0]
            bridge = len(cons) == 1 and d.gap[u, v0] == 0
            if bridge:
                self.exact.add(x)
            for k in range(max(1, d.lo[u] + 1), max(d.hi[v] for v in cons) + 1):
                if d.comm[x] > 0 or (memory_matters and d.stash[k][x]):
                    self.r[x, k] = (self.y[v0][k] - self.y[u][k] if bridge
                                    else m.new_bool_var(f"r[{x},{k}]"))
            for j in range(d.lo[u], min(d.hi[u], big_k - 2) + 1):
                most = min(len(cons), big_k - 1 - j)
                if d.comm[x] == 0:
                    continue
                if bridge:
                    self.n[x, j] = self.y[v0][j + 1] - self.y[u][j + 1]
                else:
                    self.n[x, j] = (m.new_bool_var(f"n[{x},{j}]") if most == 1
                                    else m.new_int_var(0, most, f"n[{x},{j}]"))
        # h[t][k]: stage k holds a copy of tied parameter t (only where memory matters).
        self.h: dict[tuple[int, int], Any] = {}
        for t, (_, users, size) in enumerate(d.tied):
            for k in range(big_k):
                if memory_matters and size and any(d.lo[i] <= k <= d.hi[i] for i in users):
                    self.h[t, k] = m.new_bool_var(f"h[{t},{k}]")

        # -- constraints ----------------------------------------------------------------------
        for i in range(n):  # The order encoding: stage(i) >= k+1 implies stage(i) >= k.
            for k in range(1, big_k):
                self._implies(self.y[i][k + 1], self.y[i][k])
        for u in range(n):  # Convexity: no edge goes back, stage(u) <= stage(v).
            for v in d.succ[u]:
                for k in range(1, big_k):
                    self._implies(self.y[u][k], self.y[v][k])
        for (u, v), skip in d.gap.items():  # At most `skip` stages lie between u and v.
            for k in range(1, big_k - 1 - skip):
                self._implies(self.y[v][k + skip + 1], self.y[u][k])
        if chain_order:  # Optional: contiguous ranges in layer order (the best chain split).
            for i in range(n - 1):
                for k in range(1, big_k):
                    self._implies(self.y[i][k], self.y[i + 1][k])
        for k in range(big_k):  # Every stage holds at least one layer.
            m.add(sum(self.x(i, k) for i in range(n) if d.lo[i] <= k <= d.hi[i]) >= 1)
        for (x, k), r in self.r.items():  # A consumer of x in k, its producer not: k receives.
            u = d.producer[x]
            for v in d.consumers[x] if x not in self.exact else ():
                m.add(r >= self.x(v, k) - self.x(u, k))
        for (x, j), sent in self.n.items():  # x's producer in j sends once per receiving stage.
            if x in self.exact:
                continue
            u, cons = d.producer[x], d.consumers[x]
            for v in cons:
                m.add(sent >= self.x(u, j) - self.x(v, j))
            if len(cons) > 1:
                later = [self.r[x, k] for k in range(j + 1, big_k) if (x, k) in self.r]
                big_m = min(len(cons), big_k - 1 - j)
                m.add(sent >= sum(later) - big_m * (1 - self.x(u, j)))
        for (t, k), held in self.h.items():  # A user of t in k, its owner not: k holds a copy.
            owner, users, _ = d.tied[t]
            for i in users:
                if d.lo[i] <= k <= d.hi[i]:
                    m.add(held >= self.x(i, k) - self.x(owner, k))
        self.stage_time = [self._time(k) for k in range(big_k)]
        self.stage_memory = [self._memory(k) for k in range(big_k)]
        if d.limit is not None:  # Every stage fits the memory limit.
            for k in range(big_k):
                m.add(self.stage_memory[k] <= d.limit)

        # -- objective ------------------------------------------------------------------------
        if memory_objective:  # The largest stage memory (for the infeasibility message).
            top = sum(max(col) for col in zip(*d.area, strict=True)) + sum(
                max(col) for col in zip(*d.stash, strict=True)) + sum(s for *_, s in d.tied)
            self.objective = m.new_int_var(0, top, "max_memory")
            for expr in self.stage_memory:
                m.add(self.objective >= expr)
        else:  # The bottleneck, bounded below by the average and by the largest layer.
            least = [min(col) for col in zip(*d.work, strict=True)]
            low = max(max(least), -(-sum(least) // big_k))
            top = sum(max(col) for col in zip(*d.work, strict=True)) + sum(
                (c + g) * d.fanout(x) for x, (c, g) in enumerate(zip(d.comm, d.grad,
                                                                    strict=True)))
            self.objective = m.new_int_var(low, max(low, top), "T")
            for expr in self.stage_time:
                m.add(self.objective >= expr)
        m.minimize(self.objective)

    def x(self, i: int, k: int) -> Any:
        """1 iff layer i is in stage k, as a linear expression of y."""
        return self.y[i][k] - self.y[i][k + 1]

    def _implies(self, a: Any, b: Any) -> None:
        """a => b for literals that may be the constants 0 or 1."""
        if isinstance(a, int) and isinstance(b, int):
            if a > b:
                self.m.add_bool_or([])  # 1 => 0: an empty clause, the bounds contradict
        elif isinstance(a, int):
            if a:
                self.m.add(b == 1)
        elif isinstance(b, int):
            if not b:
                self.m.add(a == 0)
        else:
            self.m.add_implication(a, b)

    def _time(self, k: int) -> Any:
        d = self.d
        terms = [d.work[k][i] * self.x(i, k) for i in range(d.num_layers)
                 if d.lo[i] <= k <= d.hi[i] and d.work[k][i]]
        terms += [d.grad[x] * r for (x, kk), r in self.r.items() if kk == k and d.grad[x]]
        terms += [d.comm[x] * s for (x, j), s in self.n.items() if j == k]
        return sum(terms)

    def _memory(self, k: int) -> Any:
        d = self.d
        terms = [d.area[k][i] * self.x(i, k) for i in range(d.num_layers)
                 if d.lo[i] <= k <= d.hi[i] and d.area[k][i]]
        terms += [d.stash[k][x] * r for (x, kk), r in self.r.items() if kk == k and d.stash[k][x]]
        terms += [d.tied[t][2] * held for (t, kk), held in self.h.items() if kk == k]
        return sum(terms)

    def hint(self, stage_of: list[int] | tuple[int, ...]) -> None:
        """Start the search from a known assignment (values of every variable)."""
        for i, s in enumerate(stage_of):
            for k in range(self.d.stages + 1):
                if not isinstance(self.y[i][k], int):
                    self.m.add_hint(self.y[i][k], s >= k)
        d = self.d
        dests = [{stage_of[v] for v in cons} - {stage_of[u]}
                 for u, cons in zip(d.producer, d.consumers, strict=True)]
        for (x, k), r in self.r.items():
            if x not in self.exact:
                self.m.add_hint(r, k in dests[x])
        for (x, j), sent in self.n.items():
            if x not in self.exact:
                self.m.add_hint(sent, len(dests[x]) if stage_of[d.producer[x]] == j else 0)
        for (t, k), held in self.h.items():
            owner, users, _ = d.tied[t]
            self.m.add_hint(held, stage_of[owner] != k and any(stage_of[i] == k for i in users))

    def stage_of(self, solver: cp_model.CpSolver) -> list[int]:
        return [sum(v if isinstance(v, int) else int(solver.boolean_value(v))
                    for v in self.y[i][1:self.d.stages]) for i in range(self.d.num_layers)]


def _solver(time_limit_s: float, workers: int | None) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    # CP-SAT's portfolio (LP-based, propagation-only and local-search workers) proves these
    # bounds far sooner with 8 workers than with 2, even sharing 2 cores; probing in presolve
    # costs seconds on large graphs and gains nothing measurable here.
    solver.parameters.num_workers = workers or 8
    solver.parameters.cp_model_probing_level = 0
    solver.parameters.random_seed = 0
    return solver


def _chain_hint(cm: CostModel, limit: float) -> list[int] | None:
    """The chain DP's partition of the layer order, which is always convex; None if none fits."""
    try:
        cuts = partition_chain(cm, limit).boundaries
    except InfeasibleError:
        return None
    return [k for k in range(cm.stages) for _ in range(cuts[k], cuts[k + 1])]


def _check_stages(cm: CostModel) -> None:
    if cm.stages > cm.profile.num_layers:
        raise InfeasibleError(too_many_stages(cm))


def partition_graph(cm: CostModel, memory_limit_bytes: float = math.inf, *,
                    time_limit_s: float = 30.0, workers: int | None = None,
                    chain_order: bool = False, explain: bool = True) -> Solution:
    """The convex partition of ``cm.profile``'s layer graph (a chain without ``edges``) into
    ``cm.stages`` non-empty stages with the smallest bottleneck whose stages each fit
    ``memory_limit_bytes``, within ``time_limit_s`` seconds of CP-SAT on ``workers`` threads.

    ``status`` is ``optimal`` or ``feasible`` (then ``gap`` is the proven distance to the
    optimum); ``chain_order=True`` restricts the stages to ranges of the layer order. Raises
    InfeasibleError when no partition fits (``explain=False``: without the second solve
    that finds what would fit), SolveTimeoutError when none was found in time.
    """
    _check_stages(cm)
    start = time.perf_counter()
    d = scale(cm, memory_limit_bytes)
    model = _Model(d, memory_objective=False, chain_order=chain_order)
    hint = _chain_hint(cm, memory_limit_bytes)
    if hint is not None:
        model.hint(hint)

    # -- solve ------------------------------------------------------------------------------
    solver = _solver(time_limit_s, workers)
    status = solver.solve(model.m)

    # -- status -----------------------------------------------------------------------------
    bound_ms = max(0.0, solver.best_objective_bound * d.unit_ms - d.rounding_error_ms)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        sol = evaluate_assignment(cm, model.stage_of(solver))
        name = "optimal" if status == cp_model.OPTIMAL else "feasible"
    elif status == cp_model.INFEASIBLE:
        raise InfeasibleError(_explain(cm, memory_limit_bytes, time_limit_s, workers) if explain
                              else f"no convex partition into K={cm.stages} stages fits")
    elif status == cp_model.UNKNOWN and hint is not None and _fits(
            sol := evaluate_assignment(cm, hint), memory_limit_bytes):
        name, bound_ms = "feasible", 0.0 if math.isnan(bound_ms) else bound_ms
    elif status == cp_model.UNKNOWN:
        raise SolveTimeoutError(
            f"CP-SAT found no partition of the {d.num_layers} layers into K={d.stages} stages "
            f"within the time limit of {time_limit_s:g} s; give it more time (--time-limit), "
            f"or fewer stages or more memory")
    else:  # MODEL_INVALID: a bug in this module, not in the input
        raise RuntimeError(f"CP-SAT status {solver.status_name(status)}: "
                           f"{model.m.validate() or 'no detail'}")
    bound_ms = min(bound_ms, sol.bottleneck_ms)
    return replace(sol, status=name, lower_bound_ms=bound_ms,
                   rounding_error_ms=d.rounding_error_ms, time_limit_s=time_limit_s,
                   solve_s=time.perf_counter() - start)


def _fits(sol: Solution, limit: float) -> bool:
    return max(sol.stage_memory_bytes) <= limit + _MEM_RTOL * max(1.0, limit)


def min_memory_graph(cm: CostModel, time_limit_s: float = 10.0,
                     workers: int | None = None) -> tuple[Solution, float, bool]:
    """The convex partition with the smallest largest stage memory: (solution, a proven lower
    bound on that memory in bytes, whether the solution is proven optimal)."""
    _check_stages(cm)
    d = scale(cm, math.inf, memory_objective=True)
    model = _Model(d, memory_objective=True, chain_order=False)
    hint = _chain_hint(cm, math.inf)
    if hint is not None:
        model.hint(hint)
    solver = _solver(time_limit_s, workers)
    status = solver.solve(model.m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        assert hint is not None  # without a limit the chain DP always has a partition
        return evaluate_assignment(cm, hint), 0.0, False
    sol = evaluate_assignment(cm, model.stage_of(solver))
    # every term was rounded up by less than one step: a stage has at most one per layer, per
    # value and per tied parameter
    terms = max(2 * d.num_layers, d.num_layers + len(d.producer) + len(d.tied))
    bound = (solver.best_objective_bound - terms) * d.unit_bytes
    return sol, max(0.0, bound), status == cp_model.OPTIMAL


def _explain(cm: CostModel, limit: float, time_limit_s: float, workers: int | None) -> str:
    """What would fit: the smallest limit at this K (the ILP with memory as its objective)."""
    sol, bound, proven = min_memory_graph(cm, min(time_limit_s, 10.0), workers)
    return explain_infeasible(cm, limit, f"convex partition of the {cm.profile.num_layers}-layer "
                              f"graph", max(sol.stage_memory_bytes),
                              below_bytes=None if proven else bound)
