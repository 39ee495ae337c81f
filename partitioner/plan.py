"""The ``gpipe-plan/1`` format: which layers each stage runs, with which M, and what to expect.

    >>> from partitioner import CostModel, load_profile, make_plan
    >>> plan = make_plan(CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=2))
    >>> [s.layers for s in plan.stages], plan.microbatches, plan.schedule
    ([(0, 13), (13, 26)], 4, 'gpipe')

Layer ranges are half-open [start, end). ``check_against`` refuses a plan applied to a model
with another layer count or to a profile it was not made from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .costs import OPTIMIZERS, RECOMPUTE_MODES, SCHEDULES, Link, Runtime
from .jsonfile import read_json
from .profile import Profile

__all__ = ["FORMAT", "Plan", "PlanError", "Prediction", "StagePlan", "load_plan",
           "plan_from_dict", "plan_to_dict", "save_plan"]

FORMAT = "gpipe-plan/1"


class PlanError(ValueError):
    """A plan that breaks the format or does not match the model/profile it is applied to."""


@dataclass(frozen=True)
class StagePlan:
    """Stage k: layers [start, end) on ``device`` (e.g. ``'cuda:1'``, ``'cpu'``)."""

    layers: tuple[int, int]
    device: str
    nodes: tuple[int, ...] | None = None  # graph plans: the stage's layer indices, sorted


@dataclass(frozen=True)
class Prediction:
    """What the planner expects of one training step (``method``: how it was derived)."""

    step_ms: float
    bubble_fraction: float
    stage_compute_ms: tuple[float, ...]  # per micro-batch, fwd + bwd (+ recompute)
    stage_peak_bytes: tuple[float, ...]
    stage_comm_ms: tuple[float, ...] = ()
    method: str = "closed-form"


@dataclass(frozen=True)
class Plan:
    """A complete, executable plan (see DESIGN.md, 'Plan format')."""

    profile_model: str
    profile_device: str
    profile_sha256: str
    num_layers: int
    global_batch: int
    microbatches: int
    schedule: str
    recompute: str
    stages: tuple[StagePlan, ...]
    optimizer: str = "adam"
    link: Link = field(default_factory=lambda: Link(math.inf, 0.0))
    memory_limit_bytes: float = math.inf
    predicted: Prediction | None = None
    runtime: Runtime = field(default_factory=Runtime)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Cut points of a chain plan: (0, end_0, end_1, ..., L)."""
        return (0, *(s.layers[1] for s in self.stages))

    @property
    def is_graph(self) -> bool:
        """Whether stages are node sets of a layer graph (``nodes``), not layer ranges."""
        return any(s.nodes is not None for s in self.stages)

    def check_against(self, num_layers: int, profile: Profile | None = None) -> None:
        """Raise PlanError unless the plan fits a model of ``num_layers`` layers (and profile)."""
        if num_layers != self.num_layers:
            raise PlanError(
                f"the plan covers {self.num_layers} layers but the model has {num_layers}; "
                f"make a new plan from a profile of this model (partition-model --profile ...)"
            )
        if profile is not None and profile.sha256() != self.profile_sha256:
            raise PlanError(
                f"the plan was made from profile {self.profile_model!r} "
                f"(sha256 {self.profile_sha256[:12]}…), not from {profile.model!r} "
                f"(sha256 {profile.sha256()[:12]}…); plan again from this profile"
            )
        if profile is not None and self.is_graph:
            from .graph import assignment_problems, layer_edges, stage_of_nodes

            try:
                stage_of = stage_of_nodes([s.nodes or () for s in self.stages])
            except ValueError as exc:
                raise PlanError(f"the plan's stages do not partition the layers: {exc}") from None
            problems = assignment_problems(num_layers, layer_edges(profile), stage_of,
                                           self.num_stages)
            if problems:
                raise PlanError("the plan's stages are not a convex partition of the profile's "
                                "layer graph:\n  " + "\n  ".join(problems))


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The JSON object of a plan."""
    stages = []
    for s in plan.stages:
        obj: dict[str, Any] = {"layers": list(s.layers), "device": s.device}
        if s.nodes is not None:
            obj["nodes"] = list(s.nodes)
        stages.append(obj)
    out: dict[str, Any] = {
        "format": FORMAT,
        "profile": {"model": plan.profile_model, "device": plan.profile_device,
                    "sha256": plan.profile_sha256, "layers": plan.num_layers},
        "global_batch": plan.global_batch,
        "microbatches": plan.microbatches,
        "schedule": plan.schedule,
        "recompute": plan.recompute,
        "stages": stages,
        "cost_model": {"optimizer": plan.optimizer,
                       "bandwidth_gbps": _json_float(plan.link.bandwidth_gbps),
                       "latency_ms": plan.link.latency_ms,
                       "memory_limit_bytes": _json_float(plan.memory_limit_bytes),
                       "compute_scale": plan.runtime.compute_scale,
                       "action_ms": plan.runtime.action_ms,
                       "message_ms": plan.runtime.message_ms},
    }
    if plan.predicted is not None:
        pred = asdict(plan.predicted)
        out["predicted"] = {k: list(v) if isinstance(v, tuple) else v for k, v in pred.items()}
    return out


def _float(x: object) -> float:
    if x == "inf":
        return math.inf
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    raise TypeError(x)


def plan_from_dict(data: object, source: str = "plan") -> Plan:
    """Validate a decoded plan; every problem is reported at once in one PlanError."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise PlanError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        problems.append(f"format: {data.get('format')!r} is not {FORMAT!r}")
    prof = data.get("profile") if isinstance(data.get("profile"), dict) else {}
    assert isinstance(prof, dict)
    for key, rule in (("microbatches", "M >= 1"), ("global_batch", "B >= M")):
        if not isinstance(data.get(key), int) or data[key] < 1:
            problems.append(f"{key}: {data.get(key)!r} must be a whole number ({rule})")
    if isinstance(data.get("microbatches"), int) and isinstance(data.get("global_batch"), int) \
            and data["global_batch"] < data["microbatches"]:
        problems.append(f"global_batch: {data['global_batch']} is smaller than microbatches "
                        f"{data['microbatches']}; each micro-batch needs a sample")
    if data.get("schedule") not in SCHEDULES:
        problems.append(f"schedule: {data.get('schedule')!r} is not one of {SCHEDULES}")
    if data.get("recompute") not in RECOMPUTE_MODES:
        problems.append(f"recompute: {data.get('recompute')!r} is not one of {RECOMPUTE_MODES}")
    stages = _parse_stages(data.get("stages"), problems)
    graph = any(s.nodes is not None for s in stages)
    last = max((s.layers[1] for s in stages), default=0) if graph else (
        stages[-1].layers[1] if stages else 0)
    num_layers = prof.get("layers", last)
    if graph:
        _check_nodes(stages, num_layers, problems)
    elif stages and stages[-1].layers[1] != num_layers:
        problems.append(f"stages: the last stage ends at layer {stages[-1].layers[1]} but the "
                        f"profile has {num_layers} layers")
    cost = data.get("cost_model", {})
    try:
        link = Link(_float(cost.get("bandwidth_gbps", "inf")), _float(cost.get("latency_ms", 0)))
        limit = _float(cost.get("memory_limit_bytes", "inf"))
    except TypeError as exc:
        problems.append(f"cost_model: {exc.args[0]!r} is not a number or 'inf'")
        link, limit = Link(math.inf, 0.0), math.inf
    try:
        runtime = Runtime(_float(cost.get("compute_scale", 1.0)),
                          _float(cost.get("action_ms", 0.0)), _float(cost.get("message_ms", 0.0)))
    except TypeError as exc:
        problems.append(f"cost_model: {exc.args[0]!r} is not a number")
        runtime = Runtime()
    except ValueError as exc:
        problems.append(f"cost_model: {exc}")
        runtime = Runtime()
    optimizer = cost.get("optimizer", "adam")
    if optimizer not in OPTIMIZERS:
        problems.append(f"cost_model.optimizer: {optimizer!r} is not one of {OPTIMIZERS}")
    if problems:
        raise PlanError(f"{source} is not a valid {FORMAT} plan:\n  " + "\n  ".join(problems))
    pred = data.get("predicted")
    return Plan(
        profile_model=str(prof.get("model", "")),
        profile_device=str(prof.get("device", "")),
        profile_sha256=str(prof.get("sha256", "")),
        num_layers=int(num_layers),
        global_batch=data["global_batch"],
        microbatches=data["microbatches"],
        schedule=data["schedule"],
        recompute=data["recompute"],
        stages=tuple(stages),
        optimizer=optimizer,
        link=link,
        memory_limit_bytes=limit,
        predicted=_parse_prediction(pred) if isinstance(pred, dict) else None,
        runtime=runtime,
    )


def _parse_stages(raw: object, problems: list[str]) -> list[StagePlan]:
    if not isinstance(raw, list) or not raw:
        problems.append("stages: expected a non-empty list of {layers: [start, end], device}")
        return []
    stages: list[StagePlan] = []
    expect = 0
    for k, obj in enumerate(raw):
        rng = obj.get("layers") if isinstance(obj, dict) else None
        ok = isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) for x in rng)
        if not ok or not isinstance(obj, dict):
            problems.append(f"stages[{k}].layers: {rng!r} is not a [start, end) pair")
            continue
        start, end = rng  # type: ignore[misc]
        nodes = obj.get("nodes")
        if nodes is not None and not isinstance(nodes, list):
            problems.append(f"stages[{k}].nodes: {nodes!r} is not a list of layer indices")
        if nodes is None and start != expect:
            problems.append(f"stages[{k}].layers: starts at {start} but the stage before ends "
                            f"at {expect}; stages must cover the layers in order, without gaps")
        if end <= start:
            problems.append(f"stages[{k}].layers: [{start}, {end}) is empty; every stage needs "
                            f"at least one layer")
        expect = end
        stages.append(StagePlan((start, end), str(obj.get("device", "cpu")),
                                tuple(nodes) if isinstance(nodes, list) else None))
    return stages


def _check_nodes(stages: list[StagePlan], num_layers: int, problems: list[str]) -> None:
    """A graph plan: every stage lists its nodes, sorted, and together they hold every layer
    0..L-1 exactly once (convexity needs the profile's edges: ``Plan.check_against``)."""
    seen: dict[int, int] = {}
    for k, s in enumerate(stages):
        if s.nodes is None:
            problems.append(f"stages[{k}]: has no 'nodes' but other stages do; a graph plan "
                            f"lists the nodes of every stage")
            continue
        if not s.nodes or any(not isinstance(i, int) or isinstance(i, bool) for i in s.nodes):
            problems.append(f"stages[{k}].nodes: {list(s.nodes)!r} is not a non-empty list of "
                            f"layer indices")
            continue
        if list(s.nodes) != sorted(set(s.nodes)):
            problems.append(f"stages[{k}].nodes: not sorted or not unique; list each layer once, "
                            f"in increasing order")
        if s.layers != (min(s.nodes), max(s.nodes) + 1):
            problems.append(f"stages[{k}].layers: {list(s.layers)} is not the span "
                            f"[{min(s.nodes)}, {max(s.nodes) + 1}) of its nodes")
        for i in s.nodes:
            if not 0 <= i < num_layers:
                problems.append(f"stages[{k}].nodes: layer {i} is outside 0..{num_layers - 1}")
            elif i in seen:
                problems.append(f"stages[{k}].nodes: layer {i} is also in stage {seen[i]}; "
                                f"every layer belongs to exactly one stage")
            else:
                seen[i] = k
    missing = sorted(set(range(num_layers)) - set(seen))
    if missing:
        problems.append(f"stages: layers {missing[:20]}{' ...' if len(missing) > 20 else ''} "
                        f"are in no stage; every layer belongs to exactly one stage")


def _parse_prediction(pred: Mapping[str, Any]) -> Prediction:
    def tup(key: str) -> tuple[float, ...]:
        val: Sequence[float] = pred.get(key, ())
        return tuple(float(x) for x in val)

    return Prediction(float(pred.get("step_ms", 0.0)), float(pred.get("bubble_fraction", 0.0)),
                      tup("stage_compute_ms"), tup("stage_peak_bytes"), tup("stage_comm_ms"),
                      str(pred.get("method", "closed-form")))


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file."""
    return plan_from_dict(read_json(path, "plan", PlanError), str(path))


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write a plan as indented JSON."""
    Path(path).write_text(json.dumps(plan_to_dict(plan), indent=2) + "\n")
