"""A plan applied to a traced model: trace it as the plan's profile did, and refuse a plan that does not fit.

    >>> import torch
    >>> from torch import nn
    >>> from executor.runtime.pipeline import manual_plan
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 1)
    ...     def forward(self, x):
    ...         return self.b(self.a(x))
    >>> graph = trace_for_plan(Net(), manual_plan([0, 1, 3], 2, 4), torch.ones(2, 2))
    Traceback (most recent call last):
    ...
    partitioner.formats.plan.PlanError: the plan covers 3 layers but the traced model has 2 ...

How the model is cut into layers (the tracer's leaves and ``max_layers``) comes from the plan's
``trace`` record, which the profiler wrote into the profile and the planner copied into the
plan; the layer names recorded there must be the traced model's. Checked before any work: the
layer count, the names, that every stage is a set of layers covering each layer exactly once,
and that the stages are convex in the traced graph (no value flows from a later stage back).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from executor.graphs.blocks import Leaf
from executor.graphs.layers import LayerGraph, trace_model
from partitioner.formats.layers import assignment_problems, stage_of_nodes
from partitioner.formats.plan import Plan, PlanError
from partitioner.formats.specs import is_spec, load_spec

__all__ = ["plan_nodes", "trace_for_plan", "trace_record", "trace_settings"]


def trace_record(plan: Plan) -> Mapping[str, Any]:
    """The plan's record of how its model was traced (empty for a plan without one)."""
    record = getattr(plan, "trace", None) or plan.extra.get("trace") or {}
    return record if isinstance(record, Mapping) else {}


def trace_settings(plan: Plan) -> tuple[list[Leaf], int | None, list[str] | None]:
    """(leaves, max_layers, layer names) from the plan's trace record; a leaf written as
    ``module:Class`` is loaded, any other text is a pattern of module names."""
    record = trace_record(plan)
    leaves: list[Leaf] = []
    for leaf in record.get("leaves") or []:
        if isinstance(leaf, str) and is_spec(leaf):
            cls = load_spec(leaf, "the plan's trace leaf")
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise PlanError(f"the plan's trace leaf {leaf!r} is not an nn.Module class")
            leaves.append(cls)
        elif isinstance(leaf, str):
            leaves.append(leaf)
    max_layers = record.get("max_layers")
    names = record.get("layer_names")
    return (leaves, max_layers if isinstance(max_layers, int) else None,
            [str(n) for n in names] if isinstance(names, list) else None)


def trace_for_plan(model: nn.Module, plan: Plan, sample: Any,
                   leaves: Sequence[Leaf] | None = None, check: bool = True) -> LayerGraph:
    """``model`` traced on ``sample`` the way the plan's profile was (or with ``leaves``),
    once checked against the plan (``plan_nodes``)."""
    recorded, max_layers, _names = trace_settings(plan)
    graph = trace_model(model, sample, leaves=recorded if leaves is None else leaves,
                        max_layers=max_layers, check=check)
    plan_nodes(plan, graph)
    return graph


def plan_nodes(plan: Plan, graph: LayerGraph) -> list[tuple[int, ...]]:
    """Each stage's layers, once the plan is known to fit the traced graph; PlanError
    naming what does not fit, and how to fix it, otherwise."""
    what = f"plan for {plan.profile_model!r}"
    if plan.num_layers != graph.num_layers:
        raise PlanError(f"the plan covers {plan.num_layers} layers but the traced model has "
                        f"{graph.num_layers} ({what}); profile this model with the same "
                        f"leaves and max_layers and plan again")
    _leaves, _max, names = trace_settings(plan)
    traced = [layer.name for layer in graph.layers]
    if names is not None and names != traced:
        diff = next(i for i, (a, b) in enumerate(zip(names, traced, strict=False)) if a != b) \
            if len(names) == len(traced) else min(len(names), len(traced))
        raise PlanError(f"the plan was made for another model ({what}): its layer {diff} is "
                        f"{names[diff] if diff < len(names) else '(none)'!r} but the traced "
                        f"model's is {traced[diff] if diff < len(traced) else '(none)'!r}; "
                        f"profile this model and plan again")
    is_chain = all(v == u + 1 for u, v, _ in graph.edges)
    if not plan.is_graph and not trace_record(plan) and not is_chain:
        raise PlanError(f"a chain plan ({what}, stages as layer ranges, made without a graph "
                        f"profile) cannot run a model that traces into a graph: its costs "
                        f"assumed each stage feeds only the next. Profile the model "
                        f"(partition-model profile --model ...) and plan from that profile")
    nodes = plan.stage_nodes()
    try:
        stage_of = stage_of_nodes(nodes)
    except ValueError as exc:
        raise PlanError(f"{exc} ({what})") from None
    problems = assignment_problems(graph.num_layers, [(u, v) for u, v, _ in graph.edges],
                                   stage_of, plan.num_stages)
    if problems:
        raise PlanError(f"the plan's stages are not a convex partition of the traced model "
                        f"({what}):\n  " + "\n  ".join(problems))
    return nodes
