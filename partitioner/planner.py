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

from .chain import ChainSolution, partition_chain
from .costs import CostModel
from .plan import Plan, Prediction, StagePlan
from .simulate import device_indices, ranges_from_boundaries, simulate

__all__ = ["closed_form_prediction", "default_devices", "make_plan", "plan_from_solution",
           "simulated_prediction"]


def default_devices(device_kind: str, stages: int) -> list[str]:
    """One device per stage: ``cuda:0..K-1`` for a CUDA profile, else ``cpu`` for each."""
    return [f"cuda:{k}" for k in range(stages)] if device_kind == "cuda" else ["cpu"] * stages


def closed_form_prediction(cm: CostModel, sol: ChainSolution) -> Prediction:
    """GPipe's fill-drain step: (M + K - 1) x the slowest stage (paper, Section 2.3); the
    bubble is the idle share, (K-1)/(M+K-1) when stages are balanced."""
    big_k, m = len(sol.stage_ms), cm.microbatches
    step_ms = (m + big_k - 1) * sol.bottleneck_ms
    busy = m * sum(sol.stage_ms)
    bubble = 1.0 - busy / (big_k * step_ms) if step_ms > 0 else 0.0
    compute = tuple(cm.stage_compute_ms(sol.boundaries[k], sol.boundaries[k + 1], k)
                    for k in range(big_k))
    comm = tuple(ms - c for ms, c in zip(sol.stage_ms, compute, strict=True))
    return Prediction(step_ms, bubble, compute, sol.stage_memory_bytes, comm, "closed-form")


def simulated_prediction(cm: CostModel, sol: ChainSolution,
                         devices: Sequence[str] | None = None) -> Prediction:
    """Replay the plan's schedule (``cm.schedule``) in the simulator: step, bubble and peak
    memory as the schedule runs, uneven micro-batches and communication included; the
    per-stage compute and communication stay the cost model's, per micro-batch of the
    largest size (what the partition was balanced on)."""
    big_k = len(sol.stage_ms)
    ranges = ranges_from_boundaries(sol.boundaries)
    res = simulate(cm, ranges, devices=device_indices(devices) if devices else None,
                   record=False)
    compute = tuple(cm.stage_compute_ms(start, end, k) for k, (start, end) in enumerate(ranges))
    comm = tuple(sol.stage_ms[k] - compute[k] for k in range(big_k))
    return Prediction(res.step_ms, res.bubble_fraction, compute, res.stage_peak_bytes, comm,
                      "simulated")


def plan_from_solution(
    cm: CostModel,
    sol: ChainSolution,
    memory_limit_bytes: float = math.inf,
    devices: Sequence[str] | None = None,
) -> Plan:
    """Wrap a chain solution into a plan carrying its simulated prediction."""
    big_k = len(sol.boundaries) - 1
    devices = list(devices) if devices else default_devices(cm.profile.device.kind, big_k)
    if len(devices) != big_k:
        raise ValueError(f"{len(devices)} devices given for K={big_k} stages; give one per stage")
    stages = tuple(StagePlan((sol.boundaries[k], sol.boundaries[k + 1]), devices[k])
                   for k in range(big_k))
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
        predicted=simulated_prediction(cm, sol, devices),
    )


def make_plan(
    cm: CostModel,
    memory_limit_bytes: float = math.inf,
    devices: Sequence[str] | None = None,
) -> Plan:
    """The exact chain partition for ``cm`` under the memory limit, as a plan."""
    sol = partition_chain(cm, memory_limit_bytes)
    return plan_from_solution(cm, sol, memory_limit_bytes, devices)
