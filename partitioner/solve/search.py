"""Search over K, M, recompute and schedule for the fastest simulated step under a memory limit.

    >>> from partitioner import load_profile
    >>> res = search(load_profile("h200/gpt2-medium"), devices=2, global_batch=16,
    ...              schedules=("gpipe", "1f1b"))
    >>> (res.best.stages, res.best.microbatches, res.best.schedule), res.tried
    ((2, 2, '1f1b'), 125)

For every configuration (R <= devices ranks, each schedule with the stages per rank V it
allows, so K = R x V stages: V = 1 for gpipe, 1f1b and zb-h1, 2 and 4 for interleaved where
the layers allow, 2 for zbv; M micro-batches; recompute mode) the partition function gives
the stages (K x V chunks for interleaved: the partition is solved for the schedule; with V
stages per rank each stage gets a V-th of the memory limit, and the simulator then checks each
rank's replayed peak against the whole limit). ``synth`` (in ``schedules``) adds, for the
fastest few configurations found, the schedule synthesised from their stage times
(``solve.synth``), which is never slower than the fixed ones for the same placement. The
partition function gives the stages: ``solver="auto"`` takes the exact chain DP for a chain
profile and the CP-SAT graph partition (``ilp``, ``time_limit_s`` per solve) for a profile
with edges. The simulator replays the schedule on them: the ranking is by simulated step,
which sees what the bottleneck does not (uneven micro-batches, fill and drain, how forward
and backward split a stage). Configurations that do the same thing are tried once: with
K=1, ``except_last`` is ``never``; with K=1 or M=1, 1F1B is GPipe (each kept when its twin
is not asked for).

Caching, valid for both solvers. A stage's time depends only on (K, largest micro-batch b,
recompute), so the partition without a memory limit is solved once per such triple; where
it fits the limit it is also the limited optimum (a relaxation's optimum that is feasible;
for an ILP partition that stopped at its time limit, its proven lower bound still bounds
the limited problem, so its gap stays valid). Only where it does not fit is the limited
problem solved, once per (K, b, recompute, micro-batches in flight per stage): the memory
depends on nothing else, and grows with the micro-batches in flight, so where nothing fits,
nothing fits with as many or more on every stage either (without ``keep`` the configurations
holding fewest are tried first in each (D, K, M, recompute); with it, best first). On a
graph profile ``dp`` splits the layer order (costed as ``cost.partition`` counts a graph, skip
edges included): the comparison the ILP improves on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from partitioner.cost.model import CostModel
from partitioner.cost.partition import Solution
from partitioner.formats.assumptions import LINKS, Link, Optimizer, Runtime
from partitioner.formats.plan import Plan
from partitioner.formats.plan_schedule import PLAN_SCHEDULES, SYNTH
from partitioner.formats.profile import Profile
from partitioner.formats.topology import AllReduce, Topology
from partitioner.formats.units import format_bytes
from partitioner.schedule.ir import Schedule
from partitioner.schedule.recompute import RECOMPUTE_MODES
from partitioner.simulator.durations import stage_durations
from partitioner.simulator.engine import simulate
from partitioner.solve.bounds import rank_of, stage_bound_ms, work_bound_ms
from partitioner.solve.infeasible import InfeasibleError
from partitioner.solve.microbatches import microbatch_candidates, power_of_two_microbatches
from partitioner.solve.placement import Placement, Placements, placed, replica_problems, why
from partitioner.solve.planner import partition as best_partition
from partitioner.solve.planner import plan_from_solution, resolve_solver
from partitioner.solve.search_state import Leaders, PartitionCache, PartitionFn

__all__ = ["MAX_CONFIGURATIONS", "Candidate", "PartitionFn", "SearchResult",
           "microbatch_candidates", "power_of_two_microbatches", "search"]

#: The most configurations one search tries; beyond it the search asks to be narrowed.
MAX_CONFIGURATIONS = 20_000


@dataclass(frozen=True)
class Candidate:
    """One feasible configuration and what the simulator predicts for it."""

    cost_model: CostModel
    solution: Solution
    step_ms: float
    bubble_fraction: float
    peak_bytes: float  # the largest rank's simulated peak
    synthesised: Schedule | None = None  # the schedule, when it was synthesised
    placement: Placement | None = None  # where its replicas go (None: one node, one link)
    other_steps: tuple[tuple[Placement, float], ...] = ()  # the other layouts' steps

    @property
    def replicas(self) -> int:
        return self.cost_model.replicas

    @property
    def stages(self) -> int:
        return self.cost_model.stages

    @property
    def ranks(self) -> int:
        return self.cost_model.stages // self.cost_model.stages_per_rank

    @property
    def microbatches(self) -> int:
        return self.cost_model.microbatches

    @property
    def recompute(self) -> str:
        return self.cost_model.recompute

    @property
    def schedule(self) -> str:
        return SYNTH if self.synthesised is not None else self.cost_model.schedule


@dataclass(frozen=True)
class SearchResult:
    """Feasible candidates, fastest first; how many configurations were tried and failed."""

    candidates: tuple[Candidate, ...]
    tried: int
    infeasible: int  # no partition fits the memory limit
    seconds: float
    memory_limit_bytes: float
    solver: str = "dp"  # dp, ilp, or custom (a partition function given)
    solves: int = 0  # calls of the partition function
    unsolved: int = 0  # configurations whose ILP found no partition within its time limit
    time_limit_s: float | None = None  # per ILP solve
    microbatches: tuple[int, ...] = ()  # the M tried
    replicas: tuple[int, ...] = (1,)  # the D tried
    topology: Topology | None = None
    skipped: int = 0  # not partitioned or simulated: provably slower than what is reported

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
        place = best.placement
        note = (why(place, best.step_ms, best.other_steps, best.cost_model, best.solution)
                if place is not None and best.replicas > 1 else None)
        return plan_from_solution(best.cost_model, best.solution, self.memory_limit_bytes,
                                  devices, schedule=best.synthesised, topology=self.topology,
                                  layout=place.layout if place else None, note=note)

    def best_where(self, keep: Callable[[Candidate], bool]) -> Candidate | None:
        """The fastest candidate that ``keep`` accepts (e.g. the pure pipeline, D = 1)."""
        return next((c for c in self.candidates if keep(c)), None)


def search(
    profile: Profile,
    devices: int,
    global_batch: int,
    memory_limit_bytes: float = math.inf,
    schedules: Sequence[str] = PLAN_SCHEDULES,
    recompute: Sequence[str] = RECOMPUTE_MODES,
    link: Link = LINKS["free"],
    optimizer: Optimizer = "adam",
    microbatches: Sequence[int] | None = None,
    partition: PartitionFn | None = None,
    solver: str = "auto",
    time_limit_s: float = 10.0,
    runtime: Runtime | None = None,
    *,
    topology: Topology | None = None,
    replicas: Sequence[int] | None = None,
    shard_optimizer: bool = False,
    allreduce: AllReduce = "overlapped",
    keep: int | None = None,
    jobs: int = 1,
) -> SearchResult:
    """Try every R in 1..devices ranks, schedule (with its V, K = R x V), M in
    ``microbatches`` and recompute mode; rank the feasible ones by simulated step time. ``solver`` (dp, ilp or auto) picks the
    partition function unless ``partition`` is given; ``runtime`` (default: the profile as it
    is) says how the executor's actions relate to the profile; M defaults to
    ``microbatch_candidates`` for the DP and ``power_of_two_microbatches`` for the ILP.

    Data parallelism (``solve.replicas``): ``replicas`` lists the D to try (default: 1, or
    with a ``topology`` every D that divides B, up to the devices), each with R x D <= devices
    and micro-batches of B/(D M); with several D, M defaults to the power-of-two sizes of
    B/D. On a ``topology`` each configuration's layouts (``solve.placement``) are simulated
    and the faster kept; ``shard_optimizer`` and ``allreduce`` are the cost model's.

    ``keep`` N (default: all): only the N fastest, the fastest with D = 1 and with K = 1 (and
    the configurations ``synth`` refines) must be exact; the configurations are visited in
    the order of their partition-free bound (best first), and one whose lower bound
    (``solve.bounds``) proves it slower than those found is counted in ``skipped``, neither
    partitioned nor simulated. Those candidates, and so the best plan, are what the search
    without ``keep`` finds. ``jobs``: how many configurations ``synth`` refines at once, each
    in a process of its own (the same results, sooner on several cores)."""
    devices = topology.devices if topology is not None and devices < 1 else devices
    ds = sorted(set(replicas)) if replicas else (
        [d for d in range(1, devices + 1) if global_batch % d == 0] if topology else [1])
    problems = _check(profile, devices, global_batch, schedules, recompute, microbatches)
    problems += replica_problems(ds, devices, global_batch, topology)
    if jobs < 1:
        problems.append(f"jobs={jobs} must be at least 1 (1: synthesise here, one at a time)")
    if problems:
        raise ValueError("cannot search:\n  " + "\n  ".join(problems))
    name = "custom" if partition is not None else resolve_solver(solver, profile)
    part = partition or _partition_fn(name, time_limit_s)
    fixed = [x for x in schedules if x != SYNTH]
    per_d = []
    for d in ds:
        share = global_batch // d
        if microbatches:
            ms = sorted({m for m in microbatches if m <= share})
        elif name == "ilp" or len(ds) > 1:
            ms = power_of_two_microbatches(share)
        else:
            ms = microbatch_candidates(share)
        per_d.append((d, ms, _layouts(profile.num_layers, devices // d, fixed)))
    configurations = sum(len(lay) * len(ms) for _, ms, lay in per_d) * len(recompute)
    if configurations > MAX_CONFIGURATIONS:
        raise ValueError(
            f"the search would try up to {configurations:,} configurations ((ranks, replicas, "
            f"schedule, V) layouts x values of M x {len(recompute)} recompute modes), more "
            f"than {MAX_CONFIGURATIONS:,}; narrow it: fewer --devices, the M to try "
            f"(--microbatches 1,2,4,8), the replicas (--replicas 1,8), fewer --schedules or "
            f"--recompute")
    started = time.perf_counter()
    found: list[Candidate] = []
    tried = infeasible = unsolved = 0
    cache = PartitionCache(part)
    leaders = Leaders(keep, SYNTH_TOP if SYNTH in schedules else 0) if keep else None
    skipped = 0
    places = Placements(topology, link)
    base = CostModel(profile, global_batch, 1, link=link, optimizer=optimizer,
                     runtime=runtime or Runtime(), shard_optimizer=shard_optimizer,
                     allreduce=allreduce)  # every configuration shares its per-layer arrays
    order = _configurations(base, per_d, recompute, schedules, by_flight=keep is None)
    if leaders is not None:  # best first: the table fills with fast steps, the bar drops soon
        bounds = [_work_bound(cm, places) for cm in order]
        ranked = sorted(range(len(order)), key=bounds.__getitem__)
        order, bounds = [order[j] for j in ranked], [bounds[j] for j in ranked]
    for j, cm in enumerate(order):
        tried += 1
        if leaders is not None and leaders.beaten(bounds[j], cm.stages, cm.replicas):
            skipped += 1  # provably slower before any partition
            continue
        cand = _evaluate_placed(cm, memory_limit_bytes, cache, places.of(cm), leaders)
        if isinstance(cand, Candidate):
            found.append(cand)
            if leaders is not None:
                leaders.add(cand.step_ms, cm.stages, cm.replicas, synth_key(cm))
        elif cand == "timeout":
            unsolved += 1
        elif cand == "skipped":
            skipped += 1
        else:
            infeasible += 1
    if SYNTH in schedules:
        synthesised = _synthesise_best(found, memory_limit_bytes, jobs)
        tried += len(synthesised)
        found += synthesised
    found.sort(key=lambda c: (c.step_ms, c.stages, c.peak_bytes, c.microbatches))
    return SearchResult(tuple(found), tried, infeasible, time.perf_counter() - started,
                        memory_limit_bytes, name, cache.solves, unsolved,
                        time_limit_s if name == "ilp" else None,
                        tuple(sorted({m for _, ms, _ in per_d for m in ms})), tuple(ds),
                        topology, skipped)


#: The stages per rank the search tries for each schedule (where the layers allow).
_STAGES_PER_RANK = {"gpipe": (1,), "1f1b": (1,), "zb-h1": (1,), "interleaved": (2, 4),
                    "zbv": (2,)}
#: How many of the fastest configurations get a synthesised schedule.
SYNTH_TOP = 3


def _layouts(num_layers: int, devices: int,
             schedules: Sequence[str]) -> list[tuple[int, str, int]]:
    """(K, schedule, V) for R in 1..devices ranks: K = R x V <= the layers; several stages
    per rank only with at least 2 ranks (on one rank they are one stage in pieces)."""
    out = []
    for ranks in range(1, min(devices, num_layers) + 1):  # a rank needs a layer
        for sched in schedules:
            for v in _STAGES_PER_RANK[sched]:
                if ranks * v <= num_layers and (v == 1 or ranks > 1):
                    out.append((ranks * v, sched, v))
    return out


def _synthesise_best(found: list[Candidate], limit: float, jobs: int = 1) -> list[Candidate]:
    """Synthesised schedules for the ``SYNTH_TOP`` fastest configurations found (one per
    (K, M, recompute, placement)), as candidates of their own; ``jobs`` of them at once."""
    from partitioner.solve.synth import synthesise_each  # the list scheduler, only when asked

    chosen: dict[tuple[object, ...], Candidate] = {}
    for cand in sorted(found, key=lambda c: c.step_ms):
        chosen.setdefault(synth_key(cand.cost_model), cand)
        if len(chosen) == SYNTH_TOP:
            break
    tasks = [(cand.cost_model, cand.solution) for cand in chosen.values()]
    out = []
    for cand, (got, res) in zip(chosen.values(), synthesise_each(tasks, limit, jobs),
                                strict=True):
        if res is not None:
            out.append(replace(cand, step_ms=res.step_ms, bubble_fraction=res.bubble_fraction,
                               peak_bytes=max(res.rank_peak_bytes), synthesised=got.schedule))
    return out


def _partition_fn(name: str, time_limit_s: float) -> PartitionFn:
    def solve(cm: CostModel, limit: float) -> Solution:
        return best_partition(cm, limit, name, time_limit_s, explain=False)
    return solve


def synth_key(cm: CostModel) -> tuple[object, ...]:
    """What ``_synthesise_best`` refines once: (K, M, recompute, V, whether the V shape)."""
    return (cm.stages, cm.microbatches, cm.recompute, cm.stages_per_rank, cm.schedule == "zbv")


def _configurations(base: CostModel,
                    per_d: list[tuple[int, list[int], list[tuple[int, str, int]]]],
                    recompute: Sequence[str], schedules: Sequence[str], by_flight: bool
                    ) -> list[CostModel]:
    """Every configuration's cost model (``base`` with its D, K, M, recompute, schedule and
    V, sharing base's per-layer arrays), twins left out (K = 1 ``except_last`` is ``never``;
    1F1B and ZB-H1 with K = 1 or M = 1 are GPipe, where GPipe is asked for); ``by_flight``:
    in each (D, K, M, recompute) the fewest micro-batches in flight first, since where they
    do not fit, more do not (``PartitionCache``; it generates each schedule to count them)."""
    out: list[CostModel] = []
    for d, ms, layouts in per_d:
        by_stages: dict[int, list[tuple[str, int]]] = {}
        for big_k, sched, v in layouts:
            by_stages.setdefault(big_k, []).append((sched, v))
        for big_k, group_layouts in by_stages.items():
            for m in ms:
                for rc in recompute:
                    if big_k == 1 and rc == "except_last" and "never" in recompute:
                        continue  # the only stage is the last: same as never
                    group = [base.like(microbatches=m, stages=big_k, recompute=rc,
                                       schedule=sched, stages_per_rank=v, replicas=d)
                             for sched, v in group_layouts
                             if not (sched in ("1f1b", "zb-h1") and (big_k == 1 or m == 1)
                                     and "gpipe" in schedules)]
                    out += sorted(group, key=lambda cm: sum(map(cm.in_flight, range(big_k)))
                                  ) if by_flight else group
    return out


def _work_bound(cm: CostModel, places: Placements) -> float:
    return work_bound_ms(cm, [p.allreduce_link for p in places.of(cm)])


def _evaluate(cm: CostModel, limit: float, sol: Solution) -> Candidate | str:
    res = simulate(cm, nodes=sol.nodes, record=False)
    peak = max(res.rank_peak_bytes)
    if peak > limit * (1 + 1e-9):
        return "infeasible"
    return Candidate(cm, sol, res.step_ms, res.bubble_fraction, peak)


def _evaluate_placed(cm: CostModel, limit: float, cache: PartitionCache,
                     placements: list[Placement], leaders: Leaders | None = None
                     ) -> Candidate | str:
    """Each layout of the replicas partitioned and simulated; the fastest, with the others'
    steps; ``skipped`` when ``leaders`` proves every layout that fits slower than them."""
    single = len(placements) == 1 and cm.replicas == 1 and placements[0].p2p_link == cm.link
    models = [cm] if single else [placed(cm, place) for place in placements]
    solved = [(pcm, place, cache.solve(pcm, limit))
              for pcm, place in zip(models, placements, strict=True)]
    status = "timeout" if any(sol == "timeout" for *_, sol in solved) else "infeasible"
    fits = [(pcm, place, sol) for pcm, place, sol in solved if isinstance(sol, Solution)]
    if leaders is not None and fits and all(
            leaders.beaten(_partitioned_bound(pcm, sol), pcm.stages, pcm.replicas)
            for pcm, _, sol in fits):
        return "skipped"
    got: list[Candidate] = []
    for pcm, place, sol in fits:
        cand = _evaluate(pcm, limit, sol)
        if isinstance(cand, Candidate):
            got.append(replace(cand, placement=place))
    if not got:
        return status
    got.sort(key=lambda c: c.step_ms)
    if single:
        return got[0]
    return replace(got[0], other_steps=tuple((c.placement, c.step_ms) for c in got[1:]
                                             if c.placement is not None))


def _partitioned_bound(cm: CostModel, sol: Solution) -> float:
    """``stage_bound_ms`` of ``cm`` on the stages of ``sol``."""
    ranks = rank_of(cm)
    stage_of = np.asarray(sol.stage_of, dtype=np.int64)
    return stage_bound_ms(cm, stage_durations(cm, stage_of, ranks), ranks)


def _check(profile: Profile, devices: int, global_batch: int, schedules: Sequence[str],
           recompute: Sequence[str], microbatches: Sequence[int] | None) -> list[str]:
    problems = []
    if devices < 1:
        problems.append(f"devices={devices} must be at least 1")
    if global_batch < 1:
        problems.append(f"global batch B={global_batch} must be at least 1")
    for name in schedules:
        if name not in PLAN_SCHEDULES:
            problems.append(f"schedule {name!r} is not one of {', '.join(PLAN_SCHEDULES)}")
    if list(schedules) == [SYNTH]:
        problems.append("'synth' refines the fastest fixed schedules: give it with others, "
                        "e.g. --schedules 1f1b,zb-h1,synth")
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
