"""The ``gpipe-plan/1`` format: which layers each stage runs, with which M, and what to expect.

    >>> from partitioner import CostModel, load_profile, make_plan
    >>> plan = make_plan(CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=2))
    >>> plan.layer_ranges(), plan.microbatches, plan.schedule
    ([(0, 13), (13, 26)], 4, 'gpipe')

Layer ranges are half-open [start, end); a graph plan lists each stage's layers as ``nodes``
and the values each stage sends later ones as ``messages`` (``plan_graph``).
The loader reports every problem at once with its JSON path; ``check_against`` refuses a plan
applied to a model with another layer count or to a profile it was not made from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from partitioner.formats.assumptions import OPTIMIZERS, Link, Runtime, parse_assumptions
from partitioner.formats.checks import Problems, show
from partitioner.formats.device import device_model_to_dict
from partitioner.formats.jsonfile import read_json
from partitioner.formats.layers import (
    assignment_problems,
    layer_edges,
    range_problems,
    stage_of_nodes,
)
from partitioner.formats.plan_graph import (
    messages_to_json,
    parse_messages,
    parse_tied_stages,
    tied_to_json,
)
from partitioner.formats.plan_replicas import (
    Layout,
    default_layout,
    parse_replica_fields,
    position,
    replica_fields,
)
from partitioner.formats.plan_schedule import (
    parse_schedule_fields,
    schedule_fields,
    schedule_of,
)
from partitioner.formats.profile import Profile
from partitioner.formats.topology import Topology, parse_topology, topology_to_json
from partitioner.formats.values import Message
from partitioner.schedule.generators import MAX_MICROBATCHES
from partitioner.schedule.ir import Schedule
from partitioner.schedule.recompute import RECOMPUTE_MODES, recomputes

__all__ = ["FORMAT", "MAX_GLOBAL_BATCH", "MAX_LAYERS", "Plan", "PlanError", "Prediction", "StagePlan",
           "load_plan", "plan_from_dict", "plan_to_dict", "save_plan"]

FORMAT = "gpipe-plan/1"
#: The largest global batch a plan may name (samples per step).
MAX_GLOBAL_BATCH = 2**40
#: The most layers a plan may cover.
MAX_LAYERS = 2**20

_TOP_KEYS = ("format", "profile", "global_batch", "microbatches", "schedule", "recompute",
             "stages_per_rank", "actions", "replicas", "layout", "shard_optimizer", "topology", "stages",
             "cost_model", "predicted", "messages", "tied", "trace", "extra")
_REQUIRED = ("format", "global_batch", "microbatches", "schedule", "recompute", "stages")
_PROFILE_KEYS = ("model", "device", "sha256", "layers")
_STAGE_KEYS = ("layers", "device", "nodes")
_COST_KEYS = ("optimizer", "bandwidth_gbps", "latency_ms", "memory_limit_bytes",
              "compute_scale", "action_ms", "message_ms", "device_model")
_PREDICTED_KEYS = ("step_ms", "bubble_fraction", "stage_compute_ms", "stage_peak_bytes",
                   "stage_comm_ms", "method")


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
    """A complete, executable plan (README, 'Formats')."""

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
    extra: Mapping[str, Any] = field(default_factory=dict)
    # graph plans: what each stage sends each later stage per micro-batch of the largest size
    messages: Mapping[tuple[int, int], Message] = field(default_factory=dict)
    tied: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # name -> its stages
    trace: Mapping[str, Any] = field(default_factory=dict)  # the executor's, from the profile
    stages_per_rank: int = 1  # V: interleaved and V-shaped schedules run V stages per rank
    actions: str | None = None  # a synthesised schedule's text, one line per rank
    replicas: int = 1  # D: data-parallel copies of the pipeline (plan_replicas)
    layout: Layout | None = None  # layout[d][r]: global rank of replica d's rank r; None: d R + r
    shard_optimizer: bool = False  # ZeRO-1: each of a stage's D copies keeps 1/D of its state
    topology: Topology | None = None  # the nodes and links assumed (None: one node, ``link``)

    def build_schedule(self) -> Schedule:
        """The schedule this plan runs (``plan_schedule.schedule_of``): its ranks are the
        schedule's placement."""
        return schedule_of(self.schedule, self.num_stages, self.microbatches,
                           self.stages_per_rank, self.actions)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def pipeline_ranks(self) -> int:
        """R: the ranks of one pipeline (its K stages, V per rank)."""
        return self.num_stages // self.stages_per_rank

    @property
    def world_size(self) -> int:
        """R x D: every rank the plan runs on."""
        return self.pipeline_ranks * self.replicas

    @property
    def rank_layout(self) -> Layout:
        """layout[d][r]: the global rank of replica d's pipeline rank r."""
        return self.layout or default_layout(self.pipeline_ranks, self.replicas)

    def position(self, global_rank: int) -> tuple[int, int]:
        """(replica, pipeline rank) that ``global_rank`` runs."""
        return position(self.rank_layout, global_rank)

    @property
    def replica_batch(self) -> int:
        """Samples per replica and step: B / D."""
        return self.global_batch // self.replicas

    @property
    def is_graph(self) -> bool:
        """Whether stages are node sets of a layer graph (``nodes``), not layer ranges."""
        return any(s.nodes is not None for s in self.stages)

    def recomputes(self, stage: int) -> bool:
        """Whether stage k re-materialises under the plan's recompute mode."""
        return recomputes(self.recompute, stage, self.num_stages)

    def stage_nodes(self) -> list[tuple[int, ...]]:
        """Each stage's layers: its ``nodes``, or the layers of its range."""
        return [s.nodes if s.nodes is not None else tuple(range(*s.layers))
                for s in self.stages]

    def layer_ranges(self) -> list[tuple[int, int]]:
        """Each stage's layer range [start, end), for a plan whose stages cover the layers in
        order, each exactly once (a graph plan qualifies when its nodes are such ranges);
        PlanError otherwise."""
        ranges = []
        for k, stage in enumerate(self.stages):
            nodes = stage.nodes
            if nodes is None:
                ranges.append(stage.layers)
                continue
            if list(nodes) != list(range(nodes[0], nodes[0] + len(nodes))):
                raise PlanError(
                    f"stage {k} holds layers {list(nodes)[:12]}, which are not one contiguous "
                    f"range; the executor runs stages that are layer ranges of an "
                    f"nn.Sequential (graph plans cannot run yet): plan with --solver dp")
            ranges.append((nodes[0], nodes[-1] + 1))
        problems = range_problems(ranges, self.num_layers)
        if problems:
            raise PlanError("the plan's stages do not cover the layers exactly once, in "
                            "order:\n  " + "\n  ".join(problems))
        return ranges

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Cut points of a chain plan: (0, end_0, end_1, ..., L)."""
        return (0, *(end for _, end in self.layer_ranges()))

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
            stage_of = stage_of_nodes(self.stage_nodes())
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
        **schedule_fields(plan.schedule, plan.stages_per_rank, plan.actions),
        **replica_fields(plan.replicas, plan.layout),
        **({"shard_optimizer": True} if plan.shard_optimizer else {}),
        **({"topology": topology_to_json(plan.topology)} if plan.topology else {}),
        "recompute": plan.recompute,
        "stages": stages,
        "cost_model": {"optimizer": plan.optimizer,
                       "bandwidth_gbps": _json_float(plan.link.bandwidth_gbps),
                       "latency_ms": plan.link.latency_ms,
                       "memory_limit_bytes": _json_float(plan.memory_limit_bytes),
                       "compute_scale": plan.runtime.compute_scale,
                       "action_ms": plan.runtime.action_ms,
                       "message_ms": plan.runtime.message_ms,
                       **({"device_model": device_model_to_dict(plan.runtime.device, fit=False)}
                          if plan.runtime.device else {})},
    }
    if plan.predicted is not None:
        pred = asdict(plan.predicted)
        out["predicted"] = {k: list(v) if isinstance(v, tuple) else v for k, v in pred.items()}
    if plan.messages:
        out["messages"] = messages_to_json(plan.messages)
    if plan.tied:
        out["tied"] = tied_to_json(plan.tied)
    if plan.trace:
        out["trace"] = dict(plan.trace)
    if plan.extra:
        out["extra"] = dict(plan.extra)
    return out


def plan_from_dict(data: object, source: str = "plan") -> Plan:
    """Validate a decoded plan; every problem is reported at once in one PlanError, each with
    its JSON path.

        >>> plan_from_dict({"format": "gpipe-plan/1", "global_batch": 2, "microbatches": 4,
        ...                 "schedule": "gpipe", "recompute": "never",
        ...                 "stages": [{"layers": [0, 3]}, {"layers": [2, 5]}]})
        Traceback (most recent call last):
        ...
        partitioner.formats.plan.PlanError: plan is not a valid gpipe-plan/1 plan (2 problem(s)):
          global_batch: 2 is smaller than microbatches 4; each micro-batch needs a sample
          stages: stage 1 holds layers [2, 5) but stage 0 ends at layer 3; stages must follow each other without overlap or gap
    """
    p = Problems()
    if not isinstance(data, dict):
        raise PlanError(f"{source} is not a valid {FORMAT} plan: expected a JSON object, got "
                        f"{show(data)}")
    p.keys(data, "(top)", _TOP_KEYS, required=_REQUIRED)
    if "format" in data and data["format"] != FORMAT:
        p.add("format", f"{show(data['format'])} is not {FORMAT!r}")
    prof = p.mapping(data.get("profile", {}), "profile", "model, device, sha256, layers")
    p.keys(prof, "profile", _PROFILE_KEYS)
    m = p.whole(data.get("microbatches", 1), "microbatches", low=1, high=MAX_MICROBATCHES)
    b = p.whole(data.get("global_batch", m), "global_batch", low=1, high=MAX_GLOBAL_BATCH)
    if b < m:
        p.add("global_batch", f"{b} is smaller than microbatches {m}; each micro-batch needs a "
                              f"sample")
    recompute = data.get("recompute", RECOMPUTE_MODES[0])
    if recompute not in RECOMPUTE_MODES:
        p.add("recompute", f"{show(recompute)} is not one of {', '.join(RECOMPUTE_MODES)}")
    stages = _parse_stages(data.get("stages"), p)
    graph = any(s.nodes is not None for s in stages)
    last = max((s.layers[1] for s in stages), default=1)
    num_layers = (p.whole(prof["layers"], "profile.layers", low=1, high=MAX_LAYERS,
                          default=last) if "layers" in prof else last)
    if graph:
        _check_nodes(stages, num_layers, p)
    elif stages:
        p.extend(f"stages: {problem}" for problem in
                 range_problems([s.layers for s in stages], num_layers))
    schedule, per_rank, actions = parse_schedule_fields(data, len(stages), m, p)
    replicas, layout = parse_replica_fields(data, max(1, len(stages) // per_rank), b, m, p)
    shard = data.get("shard_optimizer", False)
    if not isinstance(shard, bool):
        p.add("shard_optimizer", f"{show(shard)} is not true or false")
        shard = False
    topology = (parse_topology(data["topology"], p) if data.get("topology") is not None
                else None)
    world = replicas * max(1, len(stages) // per_rank)
    if topology is not None and world > topology.devices:
        p.add("topology", f"{topology.nodes} x {topology.devices_per_node} devices, fewer than "
                          f"the plan's {world} ranks (R x D); give a topology of at least "
                          f"{world} devices, or fewer replicas")
    cost = p.mapping(data.get("cost_model", {}), "cost_model", "the planning assumptions")
    p.keys(cost, "cost_model", _COST_KEYS)
    link, runtime = parse_assumptions(cost, p)
    limit = p.number(cost.get("memory_limit_bytes", "inf"), "cost_model.memory_limit_bytes",
                     low=1, inf_ok=True, default=math.inf)
    optimizer = cost.get("optimizer", "adam")
    if optimizer not in OPTIMIZERS:
        p.add("cost_model.optimizer", f"{show(optimizer)} is not one of {', '.join(OPTIMIZERS)}")
    predicted = (_parse_prediction(data["predicted"], len(stages), p)
                 if data.get("predicted") is not None else None)
    messages = (parse_messages(data["messages"], len(stages), p)
                if data.get("messages") is not None else {})
    tied = parse_tied_stages(data["tied"], len(stages), p) if data.get("tied") is not None else {}
    trace = p.mapping(data.get("trace", {}), "trace", "how the executor traced the model")
    extra = p.mapping(data.get("extra", {}), "extra", "free-form data")
    texts = [p.text(prof.get(key, ""), f"profile.{key}") for key in ("model", "device", "sha256")]
    if p:
        raise PlanError(f"{source} is not a valid {FORMAT} plan ({len(p)} problem(s)):\n  "
                        + "\n  ".join(p[:50])
                        + (f"\n  ... and {len(p) - 50} more" if len(p) > 50 else ""))
    return Plan(
        profile_model=texts[0], profile_device=texts[1], profile_sha256=texts[2],
        num_layers=num_layers, global_batch=b, microbatches=m, schedule=schedule,
        recompute=recompute, stages=tuple(stages), optimizer=optimizer, link=link,
        memory_limit_bytes=limit, predicted=predicted, runtime=runtime, extra=extra,
        messages=messages, tied=tied, trace=trace, stages_per_rank=per_rank, actions=actions,
        replicas=replicas, layout=layout, shard_optimizer=shard, topology=topology)


def _parse_stages(raw: object, p: Problems) -> list[StagePlan]:
    if not isinstance(raw, list) or not raw:
        p.add("stages", f"expected a non-empty list of {{layers: [start, end], device}}, got "
                        f"{show(raw)}")
        return []
    stages: list[StagePlan] = []
    for k, item in enumerate(raw):
        path = f"stages[{k}]"
        obj = p.mapping(item, path, "layers: [start, end], device")
        p.keys(obj, path, _STAGE_KEYS, required=("layers",))
        rng = obj.get("layers")
        ok = (isinstance(rng, list) and len(rng) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_LAYERS
                      for x in rng))
        if "layers" in obj and not ok:
            p.add(f"{path}.layers", f"{show(rng)} is not a [start, end) pair of layer indices")
        device = p.text(obj.get("device", "cpu"), f"{path}.device", "cpu")
        nodes = obj.get("nodes")
        if nodes is not None and not (isinstance(nodes, list) and nodes and all(
                isinstance(i, int) and not isinstance(i, bool) for i in nodes)):
            p.add(f"{path}.nodes", f"{show(nodes)} is not a non-empty list of layer indices")
            nodes = None
        if ok:
            start, end = rng  # type: ignore[misc]
            stages.append(StagePlan((start, end), device,
                                    tuple(nodes) if nodes is not None else None))
    return stages


def _check_nodes(stages: list[StagePlan], num_layers: int, p: Problems) -> None:
    """A graph plan: every stage lists its nodes, sorted, and together they hold every layer
    0..L-1 exactly once (convexity needs the profile's edges: ``Plan.check_against``)."""
    seen: dict[int, int] = {}
    for k, s in enumerate(stages):
        path = f"stages[{k}]"
        if s.nodes is None:
            p.add(path, "has no 'nodes' but other stages do; a graph plan lists the nodes of "
                        "every stage")
            continue
        if list(s.nodes) != sorted(set(s.nodes)):
            p.add(f"{path}.nodes", "not sorted or not unique; list each layer once, in "
                                   "increasing order")
        if s.layers != (min(s.nodes), max(s.nodes) + 1):
            p.add(f"{path}.layers", f"{list(s.layers)} is not the span "
                                    f"[{min(s.nodes)}, {max(s.nodes) + 1}) of its nodes")
        for i in s.nodes:
            if not 0 <= i < num_layers:
                p.add(f"{path}.nodes", f"layer {i} is outside 0..{num_layers - 1}")
            elif i in seen:
                p.add(f"{path}.nodes", f"layer {i} is also in stage {seen[i]}; every layer "
                                       f"belongs to exactly one stage")
            else:
                seen[i] = k
    missing = sorted(set(range(num_layers)) - set(seen))
    if missing:
        p.add("stages", f"layers {missing[:20]}{' ...' if len(missing) > 20 else ''} are in no "
                        f"stage; every layer belongs to exactly one stage")


def _parse_prediction(raw: object, stages: int, p: Problems) -> Prediction | None:
    pred = p.mapping(raw, "predicted", "step_ms, bubble_fraction, ...")
    p.keys(pred, "predicted", _PREDICTED_KEYS)

    def figures(key: str, high: float) -> tuple[float, ...]:
        values = pred.get(key, [])
        if not isinstance(values, list) or (values and len(values) != stages):
            p.add(f"predicted.{key}", f"{show(values)} is not a list of {stages} numbers, one "
                                      f"per stage")
            return ()
        return tuple(p.number(x, f"predicted.{key}[{k}]", high=high)
                     for k, x in enumerate(values))

    step = p.number(pred.get("step_ms", 0.0), "predicted.step_ms", high=math.inf)
    bubble = p.number(pred.get("bubble_fraction", 0.0), "predicted.bubble_fraction", high=1.0)
    return Prediction(step, bubble, figures("stage_compute_ms", math.inf),
                      figures("stage_peak_bytes", math.inf), figures("stage_comm_ms", math.inf),
                      p.text(pred.get("method", "closed-form"), "predicted.method"))


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file."""
    return plan_from_dict(read_json(path, "plan", PlanError), str(path))


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write a plan as indented JSON."""
    Path(path).write_text(json.dumps(plan_to_dict(plan), indent=2) + "\n")
