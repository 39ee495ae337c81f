"""Search over K, M, recompute and schedule for the fastest simulated step under a memory limit.

    >>> from partitioner import load_profile
    >>> res = search(load_profile("h200/gpt2-medium"), devices=2, global_batch=16)
    >>> (res.best.stages, res.best.microbatches, res.best.schedule), res.tried
    ((2, 2, '1f1b'), 125)

For every configuration (K <= devices stages, M micro-batches, recompute mode, schedule) the
partition function (default: the exact chain DP) gives the stages, and the simulator replays
the schedule on them: the ranking is by simulated step, which sees what the DP's bottleneck
does not (uneven micro-batches, fill and drain, how forward and backward split a stage).
Configurations that do the same thing are tried once: with K=1, ``except_last`` is
``never``; with K=1 or M=1, 1F1B is GPipe (each kept when its twin is not asked for). The partition without a memory limit depends only
on (K, largest micro-batch, recompute), so it is solved once per such triple; where it fits
the limit it is also the limited optimum (a relaxation's optimum that is feasible), and only
where it does not is the limited problem solved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .chain import ChainSolution, InfeasibleError, partition_chain, stage_costs
from .costs import (
    LINKS,
    RECOMPUTE_MODES,
    SCHEDULES,
    CostModel,
    Link,
    Optimizer,
    split_microbatches,
)
from .plan import Plan
from .planner import plan_from_solution
from .profile import Profile
from .report import format_table
from .simulate import ranges_from_boundaries, simulate
from .units import format_bytes

__all__ = ["Candidate", "PartitionFn", "SearchResult", "microbatch_candidates", "search",
           "search_table"]

#: Any solver with ``partition_chain``'s signature: (cost model, memory limit in bytes) ->
#: stages as cut points, raising ``InfeasibleError`` when nothing fits.
PartitionFn = Callable[[CostModel, float], ChainSolution]


@dataclass(frozen=True)
class Candidate:
    """One feasible configuration and what the simulator predicts for it."""

    cost_model: CostModel
    solution: ChainSolution
    step_ms: float
    bubble_fraction: float
    peak_bytes: float  # the largest stage's simulated peak

    @property
    def stages(self) -> int:
        return self.cost_model.stages

    @property
    def microbatches(self) -> int:
        return self.cost_model.microbatches

    @property
    def recompute(self) -> str:
        return self.cost_model.recompute

    @property
    def schedule(self) -> str:
        return self.cost_model.schedule


@dataclass(frozen=True)
class SearchResult:
    """Feasible candidates, fastest first; how many configurations were tried and failed."""

    candidates: tuple[Candidate, ...]
    tried: int
    infeasible: int
    seconds: float
    memory_limit_bytes: float

    @property
    def best(self) -> Candidate:
        if not self.candidates:
            raise InfeasibleError(
                f"none of the {self.tried} configurations fits the memory limit of "
                f"{format_bytes(self.memory_limit_bytes)}; allow more memory (--memory-limit), "
                f"more devices, or recompute (--recompute always)")
        return self.candidates[0]

    def best_plan(self, devices: Sequence[str] | None = None) -> Plan:
        """The fastest configuration as a plan (with its simulated prediction)."""
        best = self.best
        return plan_from_solution(best.cost_model, best.solution, self.memory_limit_bytes,
                                  devices)


def microbatch_candidates(global_batch: int, all_up_to: int = 64) -> list[int]:
    """M to try for a batch of B: every M up to ``all_up_to``, and beyond it, for each
    largest micro-batch size b, the fewest micro-batches that reach it, M = ceil(B/b)
    (divisors and non-divisors alike; more micro-batches of the same largest size only add
    per-micro-batch overhead).

        >>> microbatch_candidates(10), microbatch_candidates(16, all_up_to=4)
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 6, 8, 16])
    """
    if global_batch < 1:
        raise ValueError(f"global batch B={global_batch} must be at least 1")
    small = set(range(1, min(global_batch, all_up_to) + 1))
    return sorted(small | {-(-global_batch // b) for b in range(1, global_batch + 1)})


def search(
    profile: Profile,
    devices: int,
    global_batch: int,
    memory_limit_bytes: float = math.inf,
    schedules: Sequence[str] = SCHEDULES,
    recompute: Sequence[str] = RECOMPUTE_MODES,
    link: Link = LINKS["free"],
    optimizer: Optimizer = "adam",
    microbatches: Sequence[int] | None = None,
    partition: PartitionFn = partition_chain,
) -> SearchResult:
    """Try every K in 1..devices, M in ``microbatches`` (default ``microbatch_candidates``),
    recompute mode and schedule; rank the feasible ones by simulated step time."""
    problems = _check(profile, devices, global_batch, schedules, recompute, microbatches)
    if problems:
        raise ValueError("cannot search:\n  " + "\n  ".join(problems))
    ms = sorted(set(microbatches)) if microbatches else microbatch_candidates(global_batch)
    started = time.perf_counter()
    found: list[Candidate] = []
    tried = infeasible = 0
    relaxed: dict[tuple[int, int, str], ChainSolution] = {}
    for big_k in range(1, min(devices, profile.num_layers) + 1):
        for m in ms:
            for rc in recompute:
                if big_k == 1 and rc == "except_last" and "never" in recompute:
                    continue  # the only stage is the last: same as never
                for sched in schedules:
                    if sched == "1f1b" and (big_k == 1 or m == 1) and "gpipe" in schedules:
                        continue  # the same actions as gpipe
                    tried += 1
                    cm = CostModel(profile, global_batch, m, stages=big_k,
                                   recompute=rc,  # type: ignore[arg-type]
                                   schedule=sched,  # type: ignore[arg-type]
                                   link=link, optimizer=optimizer)
                    cand = _evaluate(cm, memory_limit_bytes, partition, relaxed)
                    if cand is None:
                        infeasible += 1
                    else:
                        found.append(cand)
    found.sort(key=lambda c: (c.step_ms, c.stages, c.peak_bytes, c.microbatches))
    return SearchResult(tuple(found), tried, infeasible, time.perf_counter() - started,
                        memory_limit_bytes)


def _evaluate(cm: CostModel, limit: float, partition: PartitionFn,
              relaxed: dict[tuple[int, int, str], ChainSolution]) -> Candidate | None:
    key = (cm.stages, cm.microbatch_size, cm.recompute)
    if key not in relaxed:
        relaxed[key] = partition(cm, math.inf)
    sol = stage_costs(cm, relaxed[key].boundaries)  # this M's memory on those stages
    if max(sol.stage_memory_bytes) > limit:
        try:
            sol = partition(cm, limit)
        except InfeasibleError:
            return None
    res = simulate(cm, ranges_from_boundaries(sol.boundaries), record=False)
    peak = max(res.stage_peak_bytes)
    if peak > limit * (1 + 1e-9):
        return None
    return Candidate(cm, sol, res.step_ms, res.bubble_fraction, peak)


def _check(profile: Profile, devices: int, global_batch: int, schedules: Sequence[str],
           recompute: Sequence[str], microbatches: Sequence[int] | None) -> list[str]:
    problems = []
    if devices < 1:
        problems.append(f"devices={devices} must be at least 1")
    if global_batch < 1:
        problems.append(f"global batch B={global_batch} must be at least 1")
    for name in schedules:
        if name not in SCHEDULES:
            problems.append(f"schedule {name!r} is not one of {', '.join(SCHEDULES)}")
    for name in recompute:
        if name not in RECOMPUTE_MODES:
            problems.append(f"recompute {name!r} is not one of {', '.join(RECOMPUTE_MODES)}")
    if not schedules or not recompute:
        problems.append("give at least one schedule and one recompute mode")
    for m in microbatches or ():
        if not 1 <= m <= global_batch:
            problems.append(f"M={m} micro-batches: each needs a sample, so 1 <= M <= "
                            f"B={global_batch}")
    return problems


def search_table(result: SearchResult, top: int = 10) -> str:
    """The ``top`` fastest candidates as a table, with how many were tried."""
    rows = []
    for rank, c in enumerate(result.candidates[:top], 1):
        sizes = sorted(set(split_microbatches(c.cost_model.global_batch, c.microbatches)),
                       reverse=True)
        samples_s = 1000.0 * c.cost_model.global_batch / c.step_ms if c.step_ms > 0 else 0.0
        rows.append([rank, c.stages, c.microbatches, "/".join(map(str, sizes)), c.schedule,
                     c.recompute, f"{c.step_ms:.2f}", f"{samples_s:.1f}",
                     f"{100 * c.bubble_fraction:.1f}%", f"{c.solution.bottleneck_ms:.3f}",
                     format_bytes(c.peak_bytes)])
    headers = ["rank", "K", "M", "b", "schedule", "recompute", "step_ms", "samples/s",
               "bubble", "bottleneck_ms", "peak_memory"]
    summary = (f"{result.tried} configurations tried in {result.seconds:.2f} s: "
               f"{len(result.candidates)} fit, {result.infeasible} exceed the memory limit "
               f"({format_bytes(result.memory_limit_bytes)})")
    return format_table(headers, rows) + "\n" + summary
