"""One rank's stages of a traced model: their layers only, their messages' peers, their tied copies.

    stages, peers, ties, graph = graph_rank(model, plan, [0, 3], sample, device, [0, 1, 1, 0],
                                            weights="w.pt", leaves=None, timeout_s=60,
                                            backend="gloo")
    ...   # the runner's step; then, after the step's last backward:
    sync_ties(ties)   # every copy of a tied parameter gets the sum of all copies' gradients

Each rank traces the model the same way (on the meta device when the model is there; then only
the parameters of this rank's stages become real, loaded from ``weights``, in the model itself:
build a fresh meta model for another runner), so all ranks agree on the layers, on which pairs
of stages exchange values (``peers``: every (src, dst) of the plan, for the per-pair groups of
the ordered transport) and on the tied parameters. A tied parameter used on several stages
(GPT-2's token embedding and LM head) is one parameter on each rank holding any of those
stages: stages on one rank share it, so their gradients sum in its ``.grad`` as in the plain
model (the V shape puts the first and the last stage on rank 0). Across ranks each holds a copy,
made from the same weights; after each step the copies' gradients are all-reduced (summed) over
a group of those ranks, so each rank's optimizer sees the plain model's gradient and the copies
stay identical step after step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from executor.graphs.blocks import Leaf
from executor.graphs.layers import LayerGraph
from executor.graphs.planned import plan_nodes, trace_for_plan
from executor.graphs.stage import GraphStage, graph_stages, route
from executor.graphs.weights import is_meta, materialise
from partitioner.formats.plan import Plan

__all__ = ["graph_rank", "sync_ties"]

_TIE_GROUPS: dict[tuple[Any, tuple[int, ...]], Any] = {}


def _meta(sample: Any) -> Any:
    return pytree.tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, sample)


def graph_rank(model: nn.Module, plan: Plan, indices: Sequence[int], sample: Any,
               device: torch.device, stage_ranks: Sequence[int], *,
               weights: Mapping[str, torch.Tensor] | str | Path | None,
               leaves: Sequence[Leaf] | None, timeout_s: float, backend: str,
               copies: Sequence[Sequence[int]] | None = None) -> tuple[list[GraphStage], list[tuple[int, int]],
                          list[tuple[nn.Parameter, Any]], LayerGraph]:
    """This rank's stages ``indices``, the (src, dst) pairs of every stage that exchange values,
    and this rank's tied parameters with the group of ranks holding a copy of each
    (``stage_ranks[k]``: the global rank of stage k). ``copies``: with data-parallel replicas,
    the stage ranks of every replica (this rank's among them): each replica's tied copies get
    a group of their own, and every rank makes all of them, in the same order."""
    if sample is None:
        raise ValueError("a model that is not an nn.Sequential is traced on every rank: give "
                         "sample= (a small batch of its inputs, e.g. the first two rows)")
    meta = is_meta(model)
    graph = trace_for_plan(model, plan, _meta(sample) if meta else sample, leaves,
                           check=not meta)
    nodes = plan_nodes(plan, graph)
    tied = graph.tied()  # before materialising: the copies elsewhere stay on the meta device
    aliases = _aliases(graph, tied)
    if meta:  # all of this rank's layers at once: a parameter they share stays one
        materialise((graph.module_of(i) for k in indices for i in nodes[k]), model, weights,
                    device)
    stages = graph_stages(graph, nodes, [device] * len(nodes),
                          [plan.recomputes(k) for k in range(len(nodes))], only=indices)
    stage_of = [0] * graph.num_layers
    for k, members in enumerate(nodes):
        for i in members:
            stage_of[i] = k
    _sources, dests = route(graph, stage_of)
    peers = sorted({(k, d) for k, table in enumerate(dests) for d in table}
                   | {(d, k) for k, table in enumerate(dests) for d in table})
    ties = []
    own: dict[str, nn.Parameter] = {}
    for stage in stages:
        own.update(stage.named_parameters())
    here = stage_ranks[indices[0]] if indices else None
    for name, users in sorted(tied.items()):
        for ranks in copies if copies is not None else [stage_ranks]:
            members = tuple(sorted({ranks[stage_of[i]] for i in users}))
            if len(members) < 2:  # on one rank: one parameter, its uses summed by autograd
                continue
            key = (dist.group.WORLD, members)
            if key not in _TIE_GROUPS:  # every rank makes every group, in the same order
                _TIE_GROUPS[key] = dist.new_group(list(members), backend=backend,
                                                  timeout=timedelta(seconds=timeout_s))
            if here in members:  # this rank's stages may know the parameter by another name
                ties.append((next(own[a] for a in aliases[name] if a in own), _TIE_GROUPS[key]))
    return stages, peers, ties, graph


def _aliases(graph: LayerGraph, tied: Mapping[str, Sequence[int]]) -> dict[str, list[str]]:
    """Every name the layers give each tied parameter (e.g. ``emb.weight`` and ``head.weight``),
    the one ``tied`` uses first."""
    by_id: dict[int, list[str]] = {}
    for layer in graph.layers:
        assert layer.module is not None
        for name, p in layer.module.named_parameters():
            if name not in by_id.setdefault(id(p), []):
                by_id[id(p)].append(name)
    return {name: [name] + [a for names in by_id.values() if name in names
                            for a in names if a != name] for name in tied}


def sync_ties(ties: Sequence[tuple[nn.Parameter, Any]]) -> None:
    """Sum the gradients of each tied parameter's copies over the ranks that hold one."""
    for param, group in ties:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
