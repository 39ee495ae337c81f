"""A schedule synthesised for one partition: measured stage times in, the fastest that fits out.

    >>> from partitioner import CostModel, load_profile
    >>> from partitioner.solve.planner import partition
    >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 8, stages=4, schedule="zb-h1")
    >>> found = synthesise_for(cm, partition(cm))
    >>> found.step_ms <= found.baseline_ms, found.baseline
    (True, 'zb-h1')

The bridge between the cost model and ``schedule.synthesis``: each stage's F, I, W and send
times at the largest micro-batch (``simulator.durations``) guide the list scheduler; every
candidate is then judged by the simulator itself (``evaluate``: the simulated step, uneven
micro-batches and all) and by the replayed memory (``fits``: every rank's peak within the
limit). The baselines are the fixed schedules for the same stage-to-rank placement, so the
result is never slower than them: gpipe, 1f1b and zb-h1 for one stage per rank, interleaved
for its placement, zbv for the V shape.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from partitioner.cost.model import CostModel
from partitioner.cost.partition import Solution
from partitioner.formats.plan_schedule import SYNTH
from partitioner.schedule.generators import make_schedule, v_placement
from partitioner.schedule.ir import Schedule
from partitioner.schedule.listsched import Costs
from partitioner.schedule.synthesis import Synthesis, synthesise
from partitioner.simulator.durations import stage_durations
from partitioner.simulator.engine import SimResult, simulate

__all__ = ["available_jobs", "baselines_for", "synthesise_each", "synthesise_for"]


def baselines_for(cm: CostModel) -> list[Schedule]:
    """The fixed schedules for ``cm``'s placement (K stages, M, V stages per rank)."""
    big_k, m, v = cm.stages, cm.microbatches, cm.stages_per_rank
    placed = make_schedule(cm.schedule, big_k, m, v)
    if not placed.placement:
        return [make_schedule(name, big_k, m) for name in ("gpipe", "1f1b", "zb-h1")]
    if big_k % 2 == 0 and placed.placement == v_placement(big_k // 2):
        return [placed]
    return [make_schedule("interleaved", big_k, m, v)]


def synthesise_for(cm: CostModel, sol: Solution, devices: Sequence[int] | None = None,
                   memory_limit_bytes: float = math.inf, max_tries: int = 400) -> Synthesis:
    """The fastest schedule the search finds for the partition ``sol`` of ``cm`` (stages
    placed as ``cm.schedule`` places them), every rank within ``memory_limit_bytes``."""
    placement = make_schedule(cm.schedule, cm.stages, cm.microbatches,
                              cm.stages_per_rank).rank_of
    devs = list(placement) if devices is None else list(devices)
    stage_of = np.asarray(sol.stage_of, dtype=np.int64)
    dur = stage_durations(cm, stage_of, devs)
    s = dur.size_index[0]  # the largest micro-batch
    costs = Costs(tuple(f[s] for f in dur.fwd_ms), tuple(i[s] for i in dur.input_ms),
                  tuple(w[s] for w in dur.weight_ms), tuple(x[s] for x in dur.send_f_ms),
                  tuple(x[s] for x in dur.send_b_ms))

    # fits() and evaluate() ask about the same schedule object, one after the other: kept by
    # identity, since hashing or comparing a schedule walks its K x M x 3 actions
    replayed: list[tuple[Schedule, SimResult]] = []

    def run(sched: Schedule) -> SimResult:
        if not replayed or replayed[0][0] is not sched:
            replayed[:] = [(sched, simulate(cm, nodes=sol.nodes, schedule=sched, devices=devs,
                                            record=False, durations=dur))]
        return replayed[0][1]

    def evaluate(sched: Schedule) -> float:
        return run(sched).step_ms

    def fits(sched: Schedule) -> bool:
        peak = max(run(sched).rank_peak_bytes)
        return peak <= memory_limit_bytes * (1 + 1e-9)

    return synthesise(costs, placement, cm.microbatches, evaluate=evaluate, fits=fits,
                      baselines=baselines_for(cm), max_tries=max_tries)


def available_jobs() -> int:
    """The cores this process may run on (its CPU affinity where the system says)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def synthesise_each(tasks: Sequence[tuple[CostModel, Solution]], memory_limit_bytes: float,
                    jobs: int = 1) -> list[tuple[Synthesis, SimResult | None]]:
    """``synthesise_for`` on each (cost model, partition), with the simulation of each
    schedule it synthesised (None where a fixed schedule stayed the best), in order. With
    ``jobs`` > 1, up to that many at once in forked processes (Linux: the tasks are
    independent and deterministic, so the results are those of one process); elsewhere, or
    with one task, here."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs} must be at least 1 (1: synthesise here, one at a time)")
    work = [(cm, sol, memory_limit_bytes) for cm, sol in tasks]
    if jobs == 1 or len(work) < 2 or not sys.platform.startswith("linux"):
        return [_synthesised(task) for task in work]
    with ProcessPoolExecutor(min(jobs, len(work)),
                             mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_synthesised, work))


def _synthesised(task: tuple[CostModel, Solution, float]) -> tuple[Synthesis, SimResult | None]:
    cm, sol, limit = task
    got = synthesise_for(cm, sol, memory_limit_bytes=limit)
    if got.schedule.name != SYNTH:
        return got, None
    return got, simulate(cm, nodes=sol.nodes, schedule=got.schedule, record=False)
