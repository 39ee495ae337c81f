"""From a profile and a configuration to a plan: solve the partition, predict the step.

    >>> from partitioner import CostModel, load_profile
    >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=4, recompute="always")
    >>> plan = make_plan(cm, memory_limit_bytes=80 * 2**30)
    >>> [s.layers for s in plan.stages]
    [(0, 7), (7, 14), (14, 20), (20, 26)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from .chain import ChainSolution, partition_chain
from .costs import CostModel
from .durations import stage_of_ranges
from .graph import GraphSolution, evaluate_assignment
from .plan import Plan, Prediction, StagePlan
from .simulate import device_indices, ranges_from_boundaries, simulate

__all__ = ["SOLVERS", "closed_form_prediction", "default_devices", "make_plan",
           "plan_from_graph_solution", "plan_from_solution", "resolve_solver",
           "simulated_prediction"]

Solver = Literal["dp", "ilp", "auto"]
SOLVERS: tuple[str, ...] = ("dp", "ilp", "auto")


def default_devices(device_kind: str, stages: int) -> list[str]:
    """One device per stage: ``cuda:0..K-1`` for a CUDA profile, else ``cpu`` for each."""
    return [f"cuda:{k}" for k in range(stages)] if device_kind == "cuda" else ["cpu"] * stages


def closed_form_prediction(cm: CostModel, sol: ChainSolution | GraphSolution) -> Prediction:
    """GPipe's fill-drain step: (M + K - 1) x the slowest stage (paper, Section 2.3); the
    bubble is the idle share, (K-1)/(M+K-1) when stages are balanced."""
    big_k, m = len(sol.stage_ms), cm.microbatches
    step_ms = (m + big_k - 1) * sol.bottleneck_ms
    busy = m * sum(sol.stage_ms)
    bubble = 1.0 - busy / (big_k * step_ms) if step_ms > 0 else 0.0
    if isinstance(sol, GraphSolution):
        compute = sol.stage_compute_ms
    else:
        compute = tuple(cm.stage_compute_ms(sol.boundaries[k], sol.boundaries[k + 1], k)
                        for k in range(big_k))
    comm = tuple(ms - c for ms, c in zip(sol.stage_ms, compute, strict=True))
    return Prediction(step_ms, bubble, compute, sol.stage_memory_bytes, comm, "closed-form")


def simulated_prediction(cm: CostModel, sol: ChainSolution | GraphSolution,
                         devices: Sequence[str] | None = None) -> Prediction:
    """Replay the plan's schedule (``cm.schedule``) in the simulator: step, bubble and peak
    memory as the schedule runs, uneven micro-batches and communication included; the
    per-stage compute and communication stay the cost model's (the layer graph's, skip
    edges included, on a graph profile), per micro-batch of the largest size (what the
    partition was balanced on)."""
    devs = device_indices(devices) if devices else None
    if isinstance(sol, GraphSolution):
        res = simulate(cm, nodes=sol.nodes, devices=devs, record=False)
        compute, comm = sol.stage_compute_ms, sol.stage_comm_ms
    else:
        ranges = ranges_from_boundaries(sol.boundaries)
        res = simulate(cm, ranges, devices=devs, record=False)
        if cm.profile.edges is not None:  # a chain split of a graph: the graph's costs
            graph = evaluate_assignment(cm, stage_of_ranges(ranges).tolist())
            compute, comm = graph.stage_compute_ms, graph.stage_comm_ms
        else:
            compute = tuple(cm.stage_compute_ms(start, end, k)
                            for k, (start, end) in enumerate(ranges))
            comm = tuple(sol.stage_ms[k] - compute[k] for k in range(len(ranges)))
    return Prediction(res.step_ms, res.bubble_fraction, compute, res.stage_peak_bytes, comm,
                      "simulated")


def _plan(cm: CostModel, stages: tuple[StagePlan, ...], memory_limit_bytes: float,
          predicted: Prediction) -> Plan:
    return Plan(
        profile_model=cm.profile.model,
        profile_device=cm.profile.device.name,
        profile_sha256=cm.profile.sha256(),
        num_layers=cm.profile.num_layers,
        global_batch=cm.global_batch,
        microbatches=cm.microbatches,
        schedule=cm.schedule,
        recompute=cm.recompute,
        stages=stages,
        optimizer=cm.optimizer,
        link=cm.link,
        memory_limit_bytes=memory_limit_bytes,
        predicted=predicted,
        runtime=cm.runtime,
    )


def _devices(cm: CostModel, devices: Sequence[str] | None, big_k: int) -> list[str]:
    devices = list(devices) if devices else default_devices(cm.profile.device.kind, big_k)
    if len(devices) != big_k:
        raise ValueError(f"{len(devices)} devices given for K={big_k} stages; give one per stage")
    return devices


def plan_from_solution(
    cm: CostModel,
    sol: ChainSolution,
    memory_limit_bytes: float = math.inf,
    devices: Sequence[str] | None = None,
) -> Plan:
    """Wrap a chain solution into a plan carrying its simulated prediction."""
    big_k = len(sol.boundaries) - 1
    devices = _devices(cm, devices, big_k)
    stages = tuple(StagePlan((sol.boundaries[k], sol.boundaries[k + 1]), devices[k])
                   for k in range(big_k))
    return _plan(cm, stages, memory_limit_bytes, simulated_prediction(cm, sol, devices))


def plan_from_graph_solution(
    cm: CostModel,
    sol: GraphSolution,
    memory_limit_bytes: float = math.inf,
    devices: Sequence[str] | None = None,
) -> Plan:
    """Wrap a graph partition into a plan: each stage lists its ``nodes`` (sorted layer
    indices) and, as ``layers``, their span [first, last + 1); it carries the simulated
    prediction of its schedule, as chain plans do."""
    devices = _devices(cm, devices, len(sol.nodes))
    stages = tuple(StagePlan((nodes[0], nodes[-1] + 1), devices[k], tuple(nodes))
                   for k, nodes in enumerate(sol.nodes))
    return _plan(cm, stages, memory_limit_bytes, simulated_prediction(cm, sol, devices))


def resolve_solver(solver: str, cm: CostModel) -> str:
    """``auto`` means the DP for a chain profile and the ILP for a graph profile (with edges)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
    if solver == "auto":
        return "ilp" if cm.profile.edges is not None else "dp"
    return solver


def make_plan(
    cm: CostModel,
    memory_limit_bytes: float = math.inf,
    devices: Sequence[str] | None = None,
    solver: Solver = "dp",
    time_limit_s: float = 30.0,
) -> Plan:
    """The best partition for ``cm`` under the memory limit, as a plan: the exact chain DP
    (``dp``), the CP-SAT graph partition (``ilp``, within ``time_limit_s``), or ``auto``."""
    if resolve_solver(solver, cm) == "ilp":
        from .ilp import partition_graph  # imports OR-Tools only when asked

        graph_sol = partition_graph(cm, memory_limit_bytes, time_limit_s=time_limit_s)
        return plan_from_graph_solution(cm, graph_sol, memory_limit_bytes, devices)
    sol = partition_chain(cm, memory_limit_bytes)
    return plan_from_solution(cm, sol, memory_limit_bytes, devices)
