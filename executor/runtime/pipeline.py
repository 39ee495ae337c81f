"""The library entry point: ``Pipeline(model, plan)`` trains an ``nn.Sequential`` as the plan says.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> pipe = Pipeline(model, manual_plan([0, 2, 3], microbatches=2, global_batch=6))
    >>> loss = pipe.train_step(torch.randn(6, 4), torch.randn(6, 1), torch.nn.MSELoss())
    >>> model[0].weight.grad is not None, pipe(torch.randn(6, 4)).shape
    (True, torch.Size([6, 1]))

The stages are the model's own layers, moved to their devices, so the gradients accumulate in
the model's parameters and an optimizer made from ``model.parameters()`` works unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from executor.runtime.allocator import keep_freed_memory as keep_memory
from executor.runtime.batch import Batch, move
from executor.runtime.devices import check_device
from executor.runtime.interpreter import LossFn
from executor.runtime.local import LocalRunner
from executor.runtime.stage import Stage, build_layers
from executor.runtime.ties import check_ties, tied_parameters
from partitioner.formats.plan import Plan, PlanError, StagePlan, load_plan, plan_from_dict
from partitioner.formats.plan_schedule import SYNTH
from partitioner.formats.timeline import Timeline
from partitioner.schedule.generators import SCHEDULES
from partitioner.schedule.ir import Schedule
from partitioner.schedule.recompute import RECOMPUTE_MODES

__all__ = ["Pipeline", "as_plan", "check_devices", "executable_ranges", "manual_plan",
           "one_replica"]


def as_plan(plan: Plan | Mapping[str, object] | str | Path) -> Plan:
    """A Plan from a Plan, a decoded ``gpipe-plan/1`` dict, or the path of a plan file."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return plan_from_dict(dict(plan))
    if isinstance(plan, (str, Path)):
        return load_plan(plan)
    raise TypeError(f"plan must be a Plan, a dict or a path, got {type(plan).__name__}")


def one_replica(plan: Plan) -> Plan:
    """``plan``, if it runs one pipeline; ValueError for data-parallel replicas, which need a
    process per rank (the local runner is one process)."""
    if plan.replicas != 1:
        raise ValueError(f"the plan has replicas={plan.replicas} (data-parallel copies of the "
                         f"pipeline on {plan.world_size} ranks); the local runner runs one "
                         f"pipeline in this process: run it with partition-model run (it "
                         f"spawns the {plan.world_size} ranks) or DistributedRunner under "
                         f"torchrun, or plan with --replicas 1")
    return plan


def manual_plan(boundaries: Sequence[int] | None, microbatches: int, global_batch: int,
                schedule: str = "gpipe", recompute: str = "never",
                devices: Sequence[str] | None = None, *,
                nodes: Sequence[Sequence[int]] | None = None, traced: bool = False,
                stages_per_rank: int | None = None, actions: Schedule | str | None = None
                ) -> Plan:
    """A plan from explicit cut points ``(0, end_0, ..., L)``, without a profile: stage k runs
    layers [boundaries[k], boundaries[k+1]). Or, with ``nodes`` (and ``boundaries=None``),
    stage k runs the layers ``nodes[k]`` of a traced model. ``traced`` (implied by ``nodes``)
    marks the plan as one for a traced model (``executor.graphs``) rather than an
    ``nn.Sequential``. ``stages_per_rank``: V of ``interleaved`` (default 1; ``zbv``: 2).
    ``actions``: a schedule of its own (a ``Schedule`` or its text, one line per rank), run
    as the plan's ``synth`` schedule (``schedule`` is then ignored); V is read off it. For
    tests, demos and hand-made splits."""
    if (boundaries is None) == (nodes is None):
        raise ValueError("give the stages either as boundaries or as nodes=, not "
                         + ("both" if nodes is not None else "neither"))
    if nodes is not None:
        sets = [sorted(set(n)) for n in nodes]
        big_k = len(sets)
        cuts = [0] * (big_k + 1)
        cuts[-1] = sum(len(n) for n in sets)
    else:
        assert boundaries is not None
        cuts = list(boundaries)
        big_k = len(cuts) - 1
    devices = list(devices) if devices is not None else ["cpu"] * big_k
    if actions is not None:
        sched = actions if isinstance(actions, Schedule) else Schedule.parse(actions, SYNTH)
        schedule, actions = SYNTH, str(sched)
        counts = {sched.rank_of.count(r) for r in range(sched.ranks)}
        stages_per_rank = min(counts) if stages_per_rank is None and counts else stages_per_rank
    if stages_per_rank is None:
        stages_per_rank = 2 if schedule == "zbv" else 1
    problems = []
    if nodes is not None:
        flat = sorted(i for n in sets for i in n)
        if not sets or any(not n for n in sets) or flat != list(range(len(flat))):
            problems.append(f"nodes {[list(n) for n in nodes]} must give every layer "
                            f"0..L-1 to exactly one non-empty stage")
    elif big_k < 1 or cuts[0] != 0 or any(b <= a for a, b in itertools.pairwise(cuts)):
        problems.append(f"boundaries {cuts} must start at 0 and increase strictly "
                        f"(e.g. [0, 3, 7] for two stages of a 7-layer model)")
    if len(devices) != max(big_k, 0):
        problems.append(f"{len(devices)} devices for K={big_k} stages; give one per stage")
    if schedule not in SCHEDULES and actions is None:
        problems.append(f"schedule {schedule!r} is not one of {SCHEDULES}")
    if recompute not in RECOMPUTE_MODES:
        problems.append(f"recompute {recompute!r} is not one of {RECOMPUTE_MODES}")
    if microbatches < 1 or global_batch < microbatches:
        problems.append(f"need 1 <= M <= B, got M={microbatches}, B={global_batch}")
    if problems:
        raise ValueError("cannot make the plan: " + "; ".join(problems))
    if nodes is not None:
        stages = tuple(StagePlan((n[0], n[-1] + 1), devices[k], tuple(n))
                       for k, n in enumerate(sets))
    else:
        stages = tuple(StagePlan((cuts[k], cuts[k + 1]), devices[k]) for k in range(big_k))
    trace = {"tracer": "auto"} if traced or nodes is not None else {}
    plan = Plan("manual", "", "", cuts[-1], global_batch, microbatches, schedule, recompute,
                stages, trace=trace, stages_per_rank=stages_per_rank, actions=actions)
    try:
        plan.build_schedule()
    except ValueError as exc:
        raise ValueError(f"cannot make the plan: its schedule: {exc}") from None
    return plan


def executable_ranges(plan: Plan, num_layers: int) -> list[tuple[int, int]]:
    """The plan's stage ranges, once checked against a model of ``num_layers`` layers: the
    plan covers that many, and its stages are layer ranges covering every layer exactly once,
    in pipeline order. PlanError otherwise, before any work."""
    try:
        plan.check_against(num_layers)
        return plan.layer_ranges()
    except PlanError as exc:
        raise PlanError(f"{exc} (plan for {plan.profile_model!r})") from None


def check_devices(devices: Sequence[str | torch.device], stages: int) -> list[str]:
    """Every device exists and there is one per stage, or a ValueError listing each problem."""
    problems = [] if len(devices) == stages else [
        f"{len(devices)} devices given for K={stages} stages; give one per stage"]
    problems += [f"stage {k}: {p}" for k, d in enumerate(devices) if (p := check_device(d))]
    if problems:
        raise ValueError("bad devices:\n  " + "\n  ".join(problems))
    return [str(d) for d in devices]


class Pipeline:
    """Train ``model`` (an ``nn.Sequential``) as ``plan`` says, in this process: stage k runs
    its layer range on ``devices[k]`` (default: the plan's devices). ``deferred_batchnorm``
    takes BatchNorm running statistics over the whole mini-batch instead of per micro-batch."""

    def __init__(self, model: nn.Sequential, plan: Plan | Mapping[str, object] | str | Path,
                 devices: Sequence[str | torch.device] | None = None, *,
                 deferred_batchnorm: bool = False, keep_freed_memory: bool = False) -> None:
        if not isinstance(model, nn.Sequential):
            raise TypeError(f"model must be an nn.Sequential (its children are the layers the "
                            f"plan splits), got {type(model).__name__}; wrap the layers in "
                            f"nn.Sequential(...)")
        self.plan = one_replica(as_plan(plan))
        ranges = executable_ranges(self.plan, len(model))
        check_ties(tied_parameters(model), ranges)
        chosen = devices if devices is not None else [s.device for s in self.plan.stages]
        self.devices = check_devices(chosen, self.plan.num_stages)
        if keep_freed_memory:
            keep_memory()
        self.model = model
        self.stages = [Stage(k, build_layers(model, *rng), self.devices[k],
                             recompute=self.plan.recomputes(k))
                       for k, rng in enumerate(ranges)]
        self.runner = LocalRunner(self.stages, self.plan.build_schedule(),
                                  self.plan.microbatches, deferred_batchnorm)
        self.last_timeline: Timeline | None = None

    def train_step(self, inputs: Batch, targets: Batch, loss_fn: LossFn) -> torch.Tensor:
        """One step of the plan's schedule over the batch: returns the batch's loss (mean over
        the samples, as ``loss_fn(model(inputs), targets)`` with a mean-reduced loss), detached;
        gradients accumulate in the model's parameters. ``inputs`` go to the first stage's
        device, ``targets`` to the last's."""
        first, last = self.stages[0].device, self.stages[-1].device
        loss, self.last_timeline = self.runner.train_step(
            move(inputs, first), move(targets, last), loss_fn)
        return loss

    def __call__(self, inputs: Batch) -> Batch:
        """Forward only (evaluation, no autograd): the model's outputs for the whole batch."""
        out, self.last_timeline = self.runner.forward(move(inputs, self.stages[0].device))
        return out

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())
