"""A captured graph cut into layers: module-level groups of operations, and the values between them.

    >>> import torch
    >>> from torch import nn
    >>> class Skip(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return self.b(self.a(x)) + x
    >>> g = trace_model(Skip(), torch.ones(2, 4), leaves=[nn.Linear])
    >>> [layer.name for layer in g.layers], g.edges
    (['a', 'b', 'add'], [(0, 1, ('a',)), (0, 2, ('x',)), (1, 2, ('b',))])

Layers are maximal runs of consecutive operations (in the graph's order, which is the order
they execute in) that belong to one call of one block (``blocks.block_paths``); the code
between blocks (embeddings, the final norm, the head, pooling, a U-Net's concatenations)
forms a layer per run. Each layer is a run of a topological order, so the layers are in a
topological order too and no cut of them can make a cycle. A *value* is the result of one
operation that another layer reads; the model's inputs are values of layer 0 and the model's
output is read by the last layer, so layer 0 comes first and the last layer last in every
convex partition (ordering-only edges, which carry nothing, tie in any layer that would
otherwise have no predecessor or no successor). A module called twice makes two layers
sharing its parameters (``tied``). ``max_layers`` merges the neighbouring pair of layers with
the fewest operations until at most that many remain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import fx, nn

from executor.graphs.blocks import Leaf
from executor.graphs.capture import Capture, TraceError, capture

__all__ = ["GraphLayer", "LayerGraph", "as_call", "sample_run", "shortcut_paths", "trace_model"]

_SKIP_TARGETS = ("_guards_fn",)  # export's input checks: not part of any layer


@dataclass
class GraphLayer:
    """Layer ``index``: its operations, the values it reads from other layers (or the model's
    inputs), the values other layers read from it, and a module that runs it."""

    index: int
    name: str
    nodes: list[fx.Node]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    module: fx.GraphModule | None = None


def as_call(sample: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a sample: a tensor, a tuple of positional inputs, or a dict of
    keyword inputs."""
    if isinstance(sample, Mapping):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    return (sample,), {}


class LayerGraph:
    """A model's forward as layers; ``run(args, kwargs)`` executes them in order, which is what
    a pipeline does across its stages."""

    def __init__(self, cap: Capture, model: nn.Module, max_layers: int | None = None) -> None:
        self.capture, self.model = cap, model
        runs = _runs(cap)
        if max_layers is not None:
            if max_layers < 1:
                raise ValueError(f"max_layers={max_layers} must be at least 1")
            runs = _merge(runs, max_layers)
        names = _names(runs, cap)
        self.layers = [GraphLayer(i, names[i], nodes) for i, nodes in enumerate(runs)]
        self.producer: dict[str, int] = {}
        for p in cap.placeholders():
            self.producer[p.name] = 0
        for layer in self.layers:
            for node in layer.nodes:
                self.producer[node.name] = layer.index
        self.output_names = [n.name for n in cap.output_values()]
        self.needs_grad: dict[str, tuple[bool, ...]] = {}  # set by sample_run
        self.trace_device = torch.device("cpu")  # where the sample was (set by trace_model)
        self._wire()
        self._build()

    def retarget(self, indices: Sequence[int], device: torch.device) -> None:
        """Make layers ``indices`` create their tensors on ``device``: a graph captured by
        torch.export names the sample's device in operations such as ``arange``."""
        old = self.trace_device

        def swap(arg: Any) -> Any:
            if isinstance(arg, torch.device) and (arg.type == "meta" or arg == old):
                return device
            return arg
        for i in indices:
            module = self.module_of(i)
            for node in module.graph.nodes:
                node.args = fx.node.map_aggregate(node.args, swap)
                node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
            module.recompile()

    def module_of(self, i: int) -> fx.GraphModule:
        """The module that runs layer ``i``."""
        module = self.layers[i].module
        assert module is not None
        return module

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _wire(self) -> None:
        """Inputs, outputs and edges of every layer, from the nodes' uses."""
        last = len(self.layers) - 1
        reads: dict[tuple[int, int], list[str]] = {}
        for layer in self.layers:
            own = {n.name for n in layer.nodes}
            needed: list[str] = []
            for node in layer.nodes:
                for src in node.all_input_nodes:
                    if src.op == "get_attr" or src.name in own or src.name in needed:
                        continue
                    needed.append(src.name)
            if layer.index == last:
                needed += [n for n in self.output_names if n not in own and n not in needed]
            if layer.index == 0:  # the model's inputs enter here
                needed = [p.name for p in self.capture.placeholders()] + [
                    n for n in needed if self.producer[n] != 0]
            layer.inputs = needed
            for name in needed:
                u = self.producer[name]
                if u != layer.index:
                    reads.setdefault((u, layer.index), []).append(name)
        for (u, _v), names in sorted(reads.items()):
            outs = self.layers[u].outputs
            outs += [n for n in names if n not in outs]
        for layer in self.layers:  # a layer's outputs in graph order
            order = {n.name: j for j, n in enumerate(layer.nodes)}
            if layer.index == 0:
                order.update({p.name: -1 - j for j, p in enumerate(
                    reversed(self.capture.placeholders()))})
            layer.outputs.sort(key=lambda n: order.get(n, 0))
        has_pred = {v for (_u, v) in reads}
        has_succ = {u for (u, _v) in reads}
        for v in range(1, len(self.layers)):
            if v not in has_pred:
                reads[0, v] = []
        for u in range(last):
            if u not in has_succ and (u, last) not in reads:
                reads[u, last] = []
        self.edges: list[tuple[int, int, tuple[str, ...]]] = [
            (u, v, tuple(sorted(names, key=self.layers[u].outputs.index)))
            for (u, v), names in sorted(reads.items())]

    def _build(self) -> None:
        """One GraphModule per layer, over the model's own parameters and modules."""
        last = len(self.layers) - 1
        keep = {id(m) for root in (self.model, self.capture.root) for m in root.modules()}
        for layer in self.layers:
            graph = fx.Graph()
            env: dict[str, fx.Node] = {}
            for name in layer.inputs:
                env[name] = graph.placeholder(name)
            for node in layer.nodes:
                for src in node.all_input_nodes:
                    if src.op == "get_attr" and src.name not in env:
                        env[src.name] = graph.node_copy(src)
                env[node.name] = graph.node_copy(node, partial(_lookup, env))
            results = [env[n] for n in layer.outputs]
            if layer.index == last:
                results += [env[n] for n in self.output_names]
            graph.output(tuple(results))
            layer.module = fx.GraphModule(self.capture.root, graph,
                                          class_name=f"Layer{layer.index}")
            shortcut_paths(layer.module, keep)

    # -- running -----------------------------------------------------------------------------

    def inputs_of(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The model's inputs as values by name."""
        return self.capture.bind(args, kwargs)

    def run_layers(self, env: dict[str, Any], indices: Sequence[int]) -> Any:
        """Run layers ``indices`` in order on ``env``; the model's output when the last layer
        is among them (else None)."""
        last = len(self.layers) - 1
        result = None
        for i in indices:
            layer = self.layers[i]
            assert layer.module is not None
            outs = layer.module(*(env[name] for name in layer.inputs))
            k = len(layer.outputs)
            env.update(zip(layer.outputs, outs[:k], strict=True))
            if i == last:
                result = self.capture.rebuild(outs[k:])
        return result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        env = self.inputs_of(args, kwargs)
        return self.run_layers(env, range(len(self.layers)))

    def parameters_of(self, indices: Sequence[int]) -> dict[str, nn.Parameter]:
        """The parameters the layers ``indices`` use, by the model's own names."""
        out: dict[str, nn.Parameter] = {}
        for i in indices:
            module = self.layers[i].module
            assert module is not None
            for name, p in module.named_parameters():
                out.setdefault(name, p)
        return out

    def tied(self) -> dict[str, list[int]]:
        """Each parameter several layers use: its name and those layers."""
        users: dict[int, list[int]] = {}
        names: dict[int, str] = {}
        for layer in self.layers:
            assert layer.module is not None
            for name, p in layer.module.named_parameters():
                users.setdefault(id(p), [])
                if layer.index not in users[id(p)]:
                    users[id(p)].append(layer.index)
                names.setdefault(id(p), name)
        return {names[key]: layers for key, layers in users.items() if len(layers) > 1}


def shortcut_paths(module: fx.GraphModule, keep: set[int]) -> None:
    """Let ``module``'s code reach its parameters without ``nn.Module.__getattr__`` at every
    step of their paths.

        >>> g = fx.Graph(); _ = g.output(g.get_attr("a.b.w"))
        >>> gm = fx.GraphModule({"a.b.w": nn.Parameter(torch.ones(1))}, g)
        >>> shortcut_paths(gm, set()); "b" in vars(gm.a), [n for n, _ in gm.named_parameters()]
        (True, ['a.b.w'])

    A layer's generated code fetches a parameter by its full path (``getattr(getattr(
    self.model.layers, "3").mlp, ...).weight``): on a block's 20 parameters some 150
    ``Module.__getattr__`` calls, the price of each a Python function (measured: a third of a
    traced ResNet's layer-by-layer forward on the CPU, whose eager forward does one such call
    per parameter). The empty modules ``fx.GraphModule`` made to hold those paths (not the
    model's own modules, whose ids are in ``keep``) also keep each child in their instance
    ``__dict__``, where plain attribute lookup finds it first; ``named_parameters``, the
    state dict and a swap of a parameter (``weights.materialise``) see the modules as before,
    and assigning a child through ``setattr`` drops the shortcut with the old one."""
    todo: list[nn.Module] = [module]
    while todo:
        holder = todo.pop()
        for name, child in holder._modules.items():
            if child is None:
                continue
            if id(child) not in keep:
                todo.append(child)
            object.__setattr__(holder, name, child)


def _lookup(env: Mapping[str, fx.Node], node: fx.Node) -> fx.Node:
    return env[node.name]


def _key(node: fx.Node, blocks: set[str]) -> str:
    """The block a node belongs to ('' for code between blocks)."""
    stack = node.meta.get("nn_module_stack") or {}
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        if path in blocks:
            return str(path)
    if node.op == "call_module" and str(node.target) in blocks:
        return str(node.target)
    return ""


def _runs(cap: Capture) -> list[list[fx.Node]]:
    runs: list[list[fx.Node]] = []
    keys: list[str] = []
    for node in cap.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.op == "call_module" and str(node.target) in _SKIP_TARGETS:
            continue
        key = _key(node, cap.blocks)
        if runs and keys[-1] == key:
            runs[-1].append(node)
        else:
            runs.append([node])
            keys.append(key)
    if not runs:
        raise TraceError("the traced forward has no operations: there is nothing to pipeline")
    return runs


def _merge(runs: list[list[fx.Node]], max_layers: int) -> list[list[fx.Node]]:
    runs = [list(r) for r in runs]
    while len(runs) > max_layers:
        j = min(range(len(runs) - 1), key=lambda i: len(runs[i]) + len(runs[i + 1]))
        runs[j:j + 2] = [runs[j] + runs[j + 1]]
    return runs


def _names(runs: list[list[fx.Node]], cap: Capture) -> list[str]:
    names: list[str] = []
    for nodes in runs:
        key = _key(nodes[0], cap.blocks)
        if key and all(_key(n, cap.blocks) == key for n in nodes):
            base = key
        else:
            paths: list[str] = []
            for n in nodes:
                stack = n.meta.get("nn_module_stack") or {}
                inner = [v[0] for v in stack.values() if isinstance(v, tuple) and v[0]]
                path = inner[-1] if inner else (str(n.target) if n.op == "call_module" else "")
                if path and path not in paths and not path.startswith("_"):
                    paths.append(path)
            paths = [p for p in paths if not any(q.startswith(f"{p}.") for q in paths)]
            base = "+".join(paths[:3]) + ("+..." if len(paths) > 3 else "") or nodes[0].name
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def trace_model(model: nn.Module, sample: Any = None, *, leaves: Sequence[Leaf] = (),
                max_layers: int | None = None, tracer: str = "auto",
                check: bool = True) -> LayerGraph:
    """``model`` as a ``LayerGraph``, captured on ``sample`` (a tensor, a tuple of positional
    inputs or a dict of keyword inputs). The layers run once on the sample (with autograd, to
    learn which values carry a gradient); with ``check`` they must give the model's own
    output (same random state; BatchNorm statistics are put back)."""
    args, kwargs = as_call(sample)
    graph = LayerGraph(capture(model, args, kwargs, leaves=leaves, tracer=tracer), model,
                       max_layers)
    graph.trace_device = next((t.device for t in torch.utils._pytree.tree_leaves((args, kwargs))
                               if isinstance(t, torch.Tensor)), torch.device("cpu"))
    sample_run(graph, args, kwargs, check)
    return graph


def sample_run(graph: LayerGraph, args: Sequence[Any], kwargs: Mapping[str, Any],
               check: bool = True) -> None:
    """Run the layers on one input: set ``graph.needs_grad`` (for each value, which of its
    tensors require a gradient) and, with ``check``, raise TraceError unless the layers give
    the model's own output."""
    model = graph.model
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    state = torch.get_rng_state()
    try:
        want = None
        if check:
            with torch.no_grad():
                want = model(*args, **{**graph.capture.extra_kwargs, **kwargs})
        torch.set_rng_state(state)
        env = graph.inputs_of(args, kwargs)
        with torch.enable_grad():
            got = graph.run_layers(env, range(graph.num_layers))
        graph.needs_grad = {
            name: tuple(t.requires_grad for t in torch.utils._pytree.tree_leaves(value)
                        if isinstance(t, torch.Tensor))
            for name, value in env.items()}
    finally:
        torch.set_rng_state(state)
        with torch.no_grad():
            for b, saved in buffers:
                if not b.is_meta and not torch.equal(b, saved):
                    b.data.copy_(saved)
    if not check:
        return
    flat_w = [t for t in torch.utils._pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    flat_g = [t.detach() for t in torch.utils._pytree.tree_leaves(got)
              if isinstance(t, torch.Tensor)]
    if len(flat_w) != len(flat_g) or any(
            a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
            for a, b in zip(flat_w, flat_g, strict=False)):
        raise TraceError(f"the traced layers of {type(model).__name__} do not compute what "
                         f"the model computes on the sample (output tensors differ); the "
                         f"graph capture lost something: make the module that differs a leaf "
                         f"(leaves=[...]) or report it with the model")
