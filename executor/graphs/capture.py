"""Capture a model's forward as one fx graph: torch.fx symbolic tracing, else torch.export.

    >>> import torch
    >>> cap = capture(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()), (torch.ones(2, 3),))
    >>> cap.tracer, [n.op for n in cap.graph.nodes]
    ('fx', ['placeholder', 'call_module', 'call_module', 'output'])

Which tracer, and why. ``torch.fx`` symbolic tracing comes first: it keeps every module call
of the model as it is (the blocks are not traced into, so code inside them may branch freely),
and the graph follows ``model.train()`` / ``model.eval()`` as the model does. It fails on
forwards that branch on their inputs or take ``**kwargs`` (every Hugging Face Transformers
model: "co_varnames is too small", "symbolically traced variables cannot be used as inputs to
control flow"); those are captured with ``torch.export`` (non-strict, so plain Python runs as
Python), with the batch dimension of every batched input dynamic, so one graph serves every
micro-batch size. An exported graph is made of ATen operations and fixes the mode it was
captured in (dropout, BatchNorm), so the caller captures again when the mode changes.
Transformers models are captured with ``use_cache=False``: training keeps no KV cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from executor.graphs.blocks import Leaf, block_paths

__all__ = ["Capture", "TraceError", "batch_of", "capture"]


class TraceError(ValueError):
    """The model's forward cannot be captured as a graph; the message names where and the fix."""


@dataclass
class Capture:
    """A captured forward: ``graph`` (of ``root``, which holds the model's own parameters),
    the tracer used, the mode captured, and how inputs bind to placeholders and outputs
    rebuild the model's output."""

    root: fx.GraphModule
    graph: fx.Graph
    tracer: str  # "fx" or "export"
    training: bool
    blocks: set[str]
    extra_kwargs: dict[str, Any]
    signature: inspect.Signature | None  # fx: the forward's, to bind inputs by name
    in_spec: Any = None  # export: the pytree spec of (args, kwargs)
    out_spec: Any = None  # export: the pytree spec of the output

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The value of every placeholder (by node name) for a call ``model(*args, **kwargs)``."""
        places = self.placeholders()
        kwargs = {**self.extra_kwargs, **kwargs}
        if self.tracer == "export":
            order = list(self.in_spec.child(1).context)
            if set(order) == set(kwargs):
                kwargs = {key: kwargs[key] for key in order}
            leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
            if spec != self.in_spec:
                raise TypeError(f"the inputs' structure {spec} is not the one the model was "
                                f"traced with ({self.in_spec}); pass the same arguments, by "
                                f"the same names, as in the sample")
            return {p.name: v for p, v in zip(places, leaves, strict=True)}
        assert self.signature is not None
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        out = {}
        for p in places:
            name = str(p.target).lstrip("*")
            if name in bound:
                out[p.name] = bound[name]
            elif p.args:
                out[p.name] = p.args[0]
            else:
                raise TypeError(f"the model's forward needs the argument {name!r}; pass it")
        return out

    def rebuild(self, flat: Sequence[Any]) -> Any:
        """The model's output from the values of the output node's arguments, in order."""
        it = iter(flat)
        filled: Any = fx.node.map_arg(self.output_node().args[0], lambda _n: next(it))
        if self.tracer == "export":
            return pytree.tree_unflatten(list(filled), self.out_spec)
        return filled

    def output_node(self) -> fx.Node:
        node: fx.Node = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        return node

    def output_values(self) -> list[fx.Node]:
        """The nodes the output is made of, in the order ``rebuild`` takes them."""
        found: list[fx.Node] = []

        def keep(node: fx.Node) -> fx.Node:
            found.append(node)
            return node
        fx.node.map_arg(self.output_node().args[0], keep)
        return found


class _Tracer(fx.Tracer):
    def __init__(self, blocks: set[str]) -> None:
        super().__init__()
        self.blocks = blocks

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.blocks or super().is_leaf_module(
            m, module_qualified_name)


def batch_of(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    """B: dimension 0 of the first tensor among the inputs (TypeError when there is none)."""
    for leaf in pytree.tree_leaves((tuple(args), dict(kwargs))):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise TypeError("the sample has no tensor with a batch dimension; give the model's inputs "
                    "as a tensor, a tuple of positional tensors or a dict of keyword tensors")


def _cache_off(model: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    config = getattr(model, "config", None)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    if getattr(config, "use_cache", None) is not None and "use_cache" in params and (
            "use_cache" not in kwargs):
        return {"use_cache": False}
    return {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _fx(model: nn.Module, blocks: set[str]) -> tuple[fx.GraphModule, fx.Graph]:
    graph = _Tracer(blocks).trace(model)
    return fx.GraphModule(model, graph), graph


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    batch = batch_of(args, kwargs)

    def dim(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch:
            return {0: torch.export.Dim.AUTO}
        return None
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < len(args):
        raise TypeError(f"{len(args)} positional inputs given, but the forward of "
                        f"{type(model).__name__} takes {len(names)}")
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    dynamic = {key: pytree.tree_map(dim, value) for key, value in bound.items()}
    return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)


def _widen(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...],
                                                                   dict[str, Any]]:
    """A sample of batch 1 doubled to 2 (export fixes a dimension of size 1)."""
    def grow(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == 1:
            return torch.cat([leaf, leaf])
        return leaf
    out = pytree.tree_map(grow, (args, kwargs))
    return out[0], out[1]


def capture(model: nn.Module, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
            *, leaves: Sequence[Leaf] = (), tracer: str = "auto") -> Capture:
    """The forward of ``model`` on ``model(*args, **kwargs)`` as one graph (``tracer``:
    ``auto``, ``fx`` or ``export``; see the module docstring). TraceError when it cannot be."""
    if tracer not in ("auto", "fx", "export"):
        raise ValueError(f"tracer {tracer!r} is not one of auto, fx, export")
    kwargs = dict(kwargs or {})
    blocks = block_paths(model, leaves)
    extra = _cache_off(model, kwargs)
    fx_error: BaseException | None = None
    if tracer in ("auto", "fx"):
        try:
            root, graph = _fx(model, blocks)
            sig = inspect.signature(model.forward)
            return Capture(root, graph, "fx", model.training, blocks, extra, sig)
        except Exception as exc:
            fx_error = exc
            if tracer == "fx":
                raise TraceError(f"torch.fx cannot trace {type(model).__name__}: "
                                 f"{_first_line(exc)}; make the module that fails a leaf "
                                 f"(leaves=[...]) or use tracer='export'") from exc
    args_t, kw = tuple(args), {**kwargs, **extra}
    if batch_of(args_t, kw) == 1:
        args_t, kw = _widen(args_t, kw)
    try:
        ep = _export(model, args_t, kw)
    except Exception as exc:
        why = f"torch.fx: {_first_line(fx_error)}; " if fx_error is not None else ""
        raise TraceError(
            f"cannot capture the forward of {type(model).__name__} as a graph ({why}"
            f"torch.export: {_first_line(exc)}). Code that branches on the values of its "
            f"inputs cannot be captured: make the module that holds it a leaf "
            f"(leaves=[ThatModule]), or give the executor an nn.Sequential of its layers"
        ) from exc
    root = ep.module()
    graph = root.graph
    _check_dynamic(graph, model)
    codegen = graph._codegen  # the pytree specs of the unlifted module's inputs and outputs
    info = codegen.pytree_info
    return Capture(root, graph, "export", model.training, blocks, extra, None,
                   info.in_spec, info.out_spec)


def _check_dynamic(graph: fx.Graph, model: nn.Module) -> None:
    """TraceError when export fixed the batch dimension (the graph would run at one size)."""
    batched = {n.name: n.meta["val"] for n in graph.nodes if n.op == "placeholder"
               and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0}
    if batched and all(isinstance(v.shape[0], int) for v in batched.values()):
        raise TraceError(f"torch.export fixed the batch size of {type(model).__name__}'s "
                         f"inputs {sorted(batched)} (its code uses the batch size as a "
                         f"constant); the pipeline runs micro-batches of other sizes: make the "
                         f"code use x.shape[0], or give an nn.Sequential")
