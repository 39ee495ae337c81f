"""From a profile and a configuration to a plan: solve the partition, predict the step.

    >>> from partitioner import CostModel, load_profile
    >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=4, recompute="always")
    >>> plan = make_plan(cm, memory_limit_bytes=80 * 2**30)
    >>> plan.layer_ranges()
    [(0, 7), (7, 14), (14, 20), (20, 26)]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Literal

from partitioner.cost.messages import stage_messages
from partitioner.cost.model import CostModel
from partitioner.cost.partition import Solution, recost
from partitioner.formats.plan import Plan, Prediction, StagePlan
from partitioner.formats.plan_replicas import Layout
from partitioner.formats.plan_schedule import SYNTH
from partitioner.formats.profile import Profile
from partitioner.formats.topology import Topology
from partitioner.schedule.generators import make_schedule
from partitioner.schedule.ir import Schedule
from partitioner.simulator.engine import device_indices, simulate
from partitioner.solve.chain import partition_chain
from partitioner.solve.placement import Placement, placed, placements, why

__all__ = ["SOLVERS", "Solver", "default_devices", "make_plan", "partition",
           "plan_from_solution", "resolve_solver"]

Solver = Literal["dp", "ilp", "auto"]
SOLVERS: tuple[str, ...] = ("dp", "ilp", "auto")


def default_devices(device_kind: str, stages: int) -> list[str]:
    """One device per stage: ``cuda:0..K-1`` for a CUDA profile, else ``cpu`` for each."""
    return [f"cuda:{k}" for k in range(stages)] if device_kind == "cuda" else ["cpu"] * stages


def resolve_solver(solver: str, profile: Profile) -> str:
    """``auto`` means the DP when the layers form a chain (no edges, or only i -> i+1: a
    traced model whose layers follow one another) and the ILP for any other layer graph."""
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
    if solver == "auto":
        edges = profile.edges
        chain = edges is None or all(v == u + 1 for u, v in edges)
        return "dp" if chain else "ilp"
    return solver


def partition(cm: CostModel, memory_limit_bytes: float = math.inf, solver: str = "auto",
              time_limit_s: float = 30.0, explain: bool = True) -> Solution:
    """The best partition for ``cm`` under the memory limit: the exact chain DP (``dp``; on a
    graph profile its split of the layer order, costed on the graph: status ``layer order``),
    the CP-SAT graph partition (``ilp``, within ``time_limit_s``), or ``auto`` (DP for chains,
    ILP for graphs). Raises InfeasibleError (and, from the ILP, SolveTimeoutError)."""
    if resolve_solver(solver, cm.profile) == "ilp":
        from partitioner.solve.ilp import partition_graph  # imports OR-Tools only when asked

        return partition_graph(cm, memory_limit_bytes, time_limit_s=time_limit_s,
                               explain=explain)
    sol = partition_chain(cm, memory_limit_bytes, explain=explain)
    if cm.profile.edges is not None:
        sol = replace(recost(cm, sol), status="layer order")
    return sol


def _prediction(cm: CostModel, sol: Solution, devices: Sequence[str],
                schedule: Schedule) -> Prediction:
    """Replay the plan's schedule in the simulator: step, bubble and peak memory as the
    schedule runs, uneven micro-batches and communication included; the per-stage compute
    and communication stay the solution's, per micro-batch of the largest size (what the
    partition was balanced on)."""
    res = simulate(cm, nodes=sol.nodes, schedule=schedule,
                   devices=device_indices(devices, schedule.rank_of), record=False)
    method = "simulated"
    if res.allreduce:
        method += ("; gradient all-reduce overlapped with the drain" if res.allreduce ==
                   "overlapped" else "; gradient all-reduce after the pipeline's compute")
    return Prediction(res.step_ms, res.bubble_fraction, sol.stage_compute_ms,
                      res.stage_peak_bytes, sol.stage_comm_ms, method)


def plan_from_solution(cm: CostModel, sol: Solution, memory_limit_bytes: float = math.inf,
                       devices: Sequence[str] | None = None,
                       schedule: Schedule | None = None, *, topology: Topology | None = None,
                       layout: Layout | None = None, note: str | None = None) -> Plan:
    """Wrap a partition into a plan carrying its simulated prediction; ``schedule`` (default:
    the one ``cm`` names) is written out when it is synthesised (a plan then names ``synth``
    and lists its actions); a fixed one (a synthesis that found none faster) names the plan. ``devices`` are per stage (default: one per rank, the stages of a
    rank on its device). A stage is written as
    its layer range [first, last + 1), with its ``nodes`` too when the stages are not ranges
    of the layer order (a graph partition). A plan from a profile with edges lists the
    messages between stages (at the largest micro-batch size, even when the stages are
    ranges); one with tied parameters, their stages; ``profile.extra["trace"]`` is copied.
    With ``cm.replicas`` D > 1 the plan names D, ``layout`` (None: the default) and the
    ``topology`` assumed; ``note`` (why this layout) goes to ``extra["placement"]``."""
    if schedule is None:
        schedule = make_schedule(cm.schedule, cm.stages, cm.microbatches, cm.stages_per_rank)
    elif schedule.name not in (SYNTH, cm.schedule):  # a fixed schedule won the synthesis:
        cm = replace(cm, schedule=schedule.name)  # type: ignore[arg-type]  # the plan names it
    if devices is None:
        per_rank = default_devices(cm.profile.device.kind, schedule.ranks)
        devices = [per_rank[r] for r in schedule.rank_of]
    devices = list(devices)
    if len(devices) != sol.stages:
        raise ValueError(f"{len(devices)} devices given for K={sol.stages} stages; give one "
                         f"per stage")
    stages = tuple(StagePlan((nodes[0], nodes[-1] + 1), devices[k],
                             None if sol.is_ranges else nodes)
                   for k, nodes in enumerate(sol.nodes))
    prof, stage_of = cm.profile, sol.stage_of
    messages = (stage_messages(prof, stage_of, cm.microbatch_size) if prof.edges is not None
                else {})
    tied = {t.name: tuple(sorted({stage_of[i] for i in t.layers})) for t in prof.tied}
    trace = prof.extra.get("trace")
    return Plan(
        profile_model=cm.profile.model,
        profile_device=cm.profile.device.name,
        profile_sha256=cm.profile.sha256(),
        num_layers=cm.profile.num_layers,
        global_batch=cm.global_batch,
        microbatches=cm.microbatches,
        schedule=SYNTH if schedule.name == SYNTH else cm.schedule,
        recompute=cm.recompute,
        stages=stages,
        optimizer=cm.optimizer,
        link=cm.link,
        memory_limit_bytes=memory_limit_bytes,
        predicted=_prediction(cm, sol, devices, schedule),
        runtime=cm.runtime,
        messages=messages,
        tied=tied,
        trace=dict(trace) if isinstance(trace, Mapping) else {},
        stages_per_rank=cm.stages_per_rank,
        actions=str(schedule) if schedule.name == SYNTH else None,
        replicas=cm.replicas,
        layout=layout,
        shard_optimizer=cm.shard_optimizer and cm.replicas > 1,
        topology=topology,
        extra={"placement": note} if note else {},
    )


def make_plan(
    cm: CostModel,
    memory_limit_bytes: float = math.inf,
    devices: Sequence[str] | None = None,
    solver: Solver = "dp",
    time_limit_s: float = 30.0,
    synthesise: bool = False,
    topology: Topology | None = None,
) -> Plan:
    """The best partition for ``cm`` under the memory limit (``partition``), as a plan; with
    ``synthesise`` its schedule is synthesised for the partition's stage times
    (``solve.synth``: never slower than the fixed schedules of its placement). With a
    ``topology`` the replicas' layouts it allows (``solve.placement``) are each partitioned
    and simulated, and the faster is planned (the plan's ``extra["placement"]`` says why).

        >>> from partitioner import load_profile
        >>> from partitioner.formats.assumptions import LINKS
        >>> cm = CostModel(load_profile("h200/gpt2-medium"), 32, 4, stages=2, replicas=4)
        >>> plan = make_plan(cm, topology=Topology(2, 4, LINKS["nvlink"], LINKS["ib"]))
        >>> plan.replicas, plan.world_size, plan.extra["placement"].split(":")[0]
        (4, 8, 'layout stage-major')
        >>> plan.rank_layout     # a stage's 4 copies on one node: the all-reduce over NVLink
        ((0, 4), (1, 5), (2, 6), (3, 7))
    """
    if topology is None:
        return _make_plan(cm, memory_limit_bytes, devices, solver, time_limit_s, synthesise)

    ranks = cm.stages // cm.stages_per_rank
    if ranks * cm.replicas > topology.devices:
        raise ValueError(f"K={cm.stages} stages on R={ranks} ranks x D={cm.replicas} replicas "
                         f"need {ranks * cm.replicas} devices; the topology has "
                         f"{topology.devices} ({topology.nodes} x "
                         f"{topology.devices_per_node}): use fewer stages or replicas, or "
                         f"more nodes")
    rank_of = make_schedule(cm.schedule, cm.stages, 1, cm.stages_per_rank).rank_of
    made: list[tuple[float, int, Placement, Plan]] = []
    for place in placements(topology, rank_of, cm.replicas):
        plan = _make_plan(placed(cm, place), memory_limit_bytes, devices, solver,
                          time_limit_s, synthesise, topology, place.layout)
        made.append((plan.predicted.step_ms if plan.predicted else 0.0, len(made), place, plan))
    made.sort(key=lambda x: (x[0], x[1]))
    step, _, chosen, plan = made[0]
    pcm = placed(cm, chosen)
    sol = recost(pcm, _solution_of(pcm, plan))
    note = why(chosen, step, [(p, s) for s, _, p, _ in made[1:]], pcm, sol)
    return replace(plan, extra={**plan.extra, "placement": note})


def _solution_of(cm: CostModel, plan: Plan) -> Solution:
    """The partition a plan holds, as a Solution to recost."""
    from partitioner.cost.partition import evaluate_assignment
    from partitioner.formats.layers import stage_of_nodes

    return evaluate_assignment(cm, stage_of_nodes(plan.stage_nodes()))


def _make_plan(cm: CostModel, memory_limit_bytes: float, devices: Sequence[str] | None,
               solver: Solver, time_limit_s: float, synthesise: bool,
               topology: Topology | None = None, layout: Layout | None = None) -> Plan:
    sol = partition(cm, memory_limit_bytes / cm.stages_per_rank, solver, time_limit_s)
    schedule = None
    if synthesise:
        from partitioner.solve.synth import synthesise_for  # the list scheduler, when asked

        schedule = synthesise_for(cm, sol, memory_limit_bytes=memory_limit_bytes).schedule
    return plan_from_solution(cm, sol, memory_limit_bytes, devices, schedule,
                              topology=topology, layout=layout)
