"""A pipeline stage of a layer graph: its layers, what it receives from each stage, what it sends.

    >>> import torch
    >>> from torch import nn
    >>> from executor.graphs.layers import trace_model
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> g = trace_model(model, torch.ones(2, 4), leaves=[nn.Linear, nn.ReLU])
    >>> stages = graph_stages(g, [[0, 1], [2]], ["cpu", "cpu"])
    >>> stages[0].destinations, stages[1].sources
    ({1: ['_1']}, {0: ['_1']})

Every value a stage reads that another stage produced arrives from that stage, once per
micro-batch, however many layers of the stage read it: a skip from stage 0 to stage 2 goes
0 -> 2 directly. Stage 0 also takes the model's inputs; the last stage rebuilds the model's
output, exactly as the model returns it (a tensor, a dict, a Transformers ``ModelOutput``).
A stage's values travel as one ``Packet`` per destination: its tensors (detached), whether a
gradient comes back for each (it does for the tensors that required one where they were
made), and a template that puts the tensors back into the values (tuples, ``None``, ints and
sizes cross as they are). Gradients of a value sent to several stages are summed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from executor.graphs.layers import LayerGraph
from executor.runtime.devices import resolve_device
from executor.runtime.interpreter import OUTPUT, Packet
from executor.runtime.stage import RngState, random_state, rng_state

__all__ = ["GraphStage", "graph_stages", "keep_buffers", "route"]


class _Slot:
    """Where tensor number ``index`` of a packet goes in a value's template."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return (_Slot, (self.index,))


def route(graph: LayerGraph, stage_of: Sequence[int]) -> tuple[list[dict[int, list[str]]],
                                                                list[dict[int, list[str]]]]:
    """Per stage, the values it receives from each source stage, and sends to each
    destination stage (in the order the producing layers list them)."""
    big_k = max(stage_of) + 1
    sources: list[dict[int, list[str]]] = [{} for _ in range(big_k)]
    dests: list[dict[int, list[str]]] = [{} for _ in range(big_k)]
    for u, v, names in graph.edges:
        src, dst = stage_of[u], stage_of[v]
        if src == dst:
            continue
        for name in names:
            if name not in sources[dst].setdefault(src, []):
                sources[dst][src].append(name)
            if name not in dests[src].setdefault(dst, []):
                dests[src][dst].append(name)
    order = {name: (graph.producer[name], j) for layer in graph.layers
             for j, name in enumerate(layer.outputs)}
    for table in (*sources, *dests):
        for key in list(table):
            if table[key]:
                table[key].sort(key=lambda n: order[n])
            else:
                del table[key]
    return [dict(sorted(t.items())) for t in sources], [dict(sorted(t.items())) for t in dests]


def _fill(leaf: Any, tensors: Sequence[torch.Tensor]) -> Any:
    return tensors[leaf.index] if isinstance(leaf, _Slot) else leaf


@contextmanager
def keep_buffers(module: nn.Module) -> Iterator[None]:
    """Buffers (BatchNorm statistics) are put back as they were after the block runs: a
    re-materialising forward updates them once, in its first forward, not twice."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():  # through .data: the buffers' version counters stay as they were,
            for b, copy in saved:  # so autograd's checks on tensors saved from them still hold
                if not b.is_meta and not torch.equal(b, copy):
                    b.data.copy_(copy)


class GraphStage:
    """Stage ``index`` of a plan over ``graph``: the layers ``layers`` (sorted) on ``device``."""

    is_graph = True

    def __init__(self, index: int, graph: LayerGraph, layers: Sequence[int],
                 device: str | torch.device, sources: dict[int, list[str]],
                 destinations: dict[int, list[str]], last: bool,
                 recompute: bool = False) -> None:
        if not layers:
            raise ValueError(f"stage {index} has no layers; every stage needs at least one")
        self.index, self.graph, self.layers = index, graph, list(layers)
        self.device = resolve_device(device)
        self.recompute = recompute
        self.sources, self.destinations, self.last = sources, destinations, last
        self._sent = list(dict.fromkeys(n for names in destinations.values() for n in names))
        if graph.trace_device != self.device or graph.trace_device.type == "meta":
            graph.retarget(self.layers, self.device)
        self.module = nn.ModuleList(graph.module_of(i) for i in self.layers)
        self.module.to(self.device)
        self.layer_range = (self.layers[0], self.layers[-1] + 1)

    def __repr__(self) -> str:
        return f"GraphStage({self.index}, layers {self.layers}, {self.device})"

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The stage's parameters by the model's own names."""
        return self.graph.parameters_of(self.layers)

    def __call__(self, x: dict[str, Any]) -> dict[str, Any]:
        """The values this stage sends on (and, on the last, the model's output under
        ``OUTPUT``); the stage's other intermediate values are not kept."""
        env = dict(x)
        out = self.graph.run_layers(env, self.layers)
        result = {name: env[name] for name in self._sent}
        if self.last:
            result[OUTPUT] = out
        return result

    # -- packets ---------------------------------------------------------------------------

    def packets(self, y: dict[str, Any]) -> dict[int, Packet]:
        """What goes to each destination stage: the values it reads, detached."""
        out = {}
        for dst, names in self.destinations.items():
            tensors: list[torch.Tensor] = []
            template: list[Any] | None = [
                pytree.tree_map(partial(self._slot, tensors=tensors), y[name]) for name in names]
            if len(tensors) == len(names) and all(isinstance(y[n], torch.Tensor) for n in names):
                template = None  # one tensor per value: the receiver needs no template
            grads = [g for name in names for g in self.graph.needs_grad[name]]
            out[dst] = Packet(tuple(tensors), False, tuple(grads), template)
        return out

    @staticmethod
    def _slot(leaf: Any, tensors: list[torch.Tensor]) -> Any:
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf.detach())
            return _Slot(len(tensors) - 1)
        return leaf

    def _carrying(self, names: Sequence[str], values: dict[str, Any]) -> list[torch.Tensor]:
        """The tensors of ``values[names]`` that carry a gradient (as the trace found)."""
        return [t for name in names for t, g in zip(
            self._grad_tensors(values[name]), self.graph.needs_grad[name], strict=True) if g]

    def unpack(self, packets: dict[int, Packet], training: bool,
               x: dict[str, Any] | None = None) -> dict[str, Any]:
        """The values of received packets (tensors that carry a gradient back become leaves
        that require one), added to ``x``."""
        x = {} if x is None else x
        for src, packet in packets.items():
            tensors = [t.requires_grad_(True) if training and g else t
                       for t, g in zip(packet.tensors, packet.needs_grad, strict=True)]
            if packet.template is None:  # one tensor per value, in order
                x.update(zip(self.sources[src], tensors, strict=True))
                continue
            for name, tmpl in zip(self.sources[src], packet.template, strict=True):
                x[name] = pytree.tree_map(partial(_fill, tensors=tensors), tmpl)
        return x

    @staticmethod
    def _grad_tensors(value: Any) -> list[torch.Tensor]:
        return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]

    def backward_roots(self, y: dict[str, Any], grads: dict[int, tuple[torch.Tensor, ...]]
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stage's sent tensors that require a gradient and the gradients that came back
        for them (summed over destinations)."""
        acc: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for dst, names in self.destinations.items():
            sent = self._carrying(names, y)
            back = grads.get(dst, ())
            if len(back) != len(sent):
                raise RuntimeError(f"stage {self.index} got {len(back)} gradients from stage "
                                   f"{dst} for {len(sent)} tensors it sent")
            for t, g in zip(sent, back, strict=True):
                if t.requires_grad:
                    acc[id(t)] = (t, acc[id(t)][1] + g if id(t) in acc else g)
        return [t for t, _ in acc.values()], [g for _, g in acc.values()]

    def input_grads(self, x: dict[str, Any]) -> dict[int, tuple[torch.Tensor, ...]]:
        """Per source stage, the gradients of the tensors received from it that carry one."""
        out = {}
        for src, names in self.sources.items():
            leaves = self._carrying(names, x)
            out[src] = tuple(t.grad if t.grad is not None else torch.zeros_like(t)
                             for t in leaves)
        return out

    def rng_state(self) -> RngState:
        return rng_state(self.device)

    @contextmanager
    def replaying(self, state: RngState) -> Iterator[None]:
        """Re-materialise from ``state``, buffers (BatchNorm statistics) left as they were."""
        with random_state(state, self.device), keep_buffers(self.module):
            yield


def graph_stages(graph: LayerGraph, nodes: Sequence[Sequence[int]],
                 devices: Sequence[str | torch.device], recompute: Sequence[bool] = (),
                 only: Iterable[int] | None = None) -> list[GraphStage]:
    """The stages holding layers ``nodes[k]`` (all of them, or only the stages ``only``, e.g.
    those of one rank), in stage order."""
    stage_of = [0] * graph.num_layers
    for k, members in enumerate(nodes):
        for i in members:
            stage_of[i] = k
    sources, dests = route(graph, stage_of)
    big_k = len(nodes)
    flags = list(recompute) or [False] * big_k
    chosen = set(range(big_k)) if only is None else set(only)
    return [GraphStage(k, graph, sorted(nodes[k]), devices[k], sources[k], dests[k],
                       k == big_k - 1, flags[k])
            for k in range(big_k) if k in chosen]
