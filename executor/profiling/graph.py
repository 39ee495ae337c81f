"""Graph profiles of torch models: trace with torch.fx, then time and measure every node.

    prof = profile_graph(my_unet, torch.randn(4, 3, 64, 64), microbatch_sizes=(1, 2, 4))
    save_profile(prof, "unet.json")     # then: partition-model --profile unet.json ...

Every call (module, function or method) of the traced graph is one layer, in the graph's
(topological) order; an edge u -> v says v reads u's output, so skip connections such as
U-Net's are edges that jump ahead. Modules listed in ``leaf_modules`` stay whole: one layer
per call, which is how to profile per block instead of per operation.

Each layer is measured on its own, at every micro-batch size: the whole model is run once to
capture each node's inputs, then the node is re-run ``repeats`` times on detached copies of
them (median forward ms; median backward ms of the input and weight gradients); the bytes
autograd saves for its backward (unique storages, parameters excluded), of its tensor inputs
and of its tensor outputs are counted. The user's model is left as it was (no gradients kept).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from torch import fx, nn

from executor.runtime.devices import device_info, resolve_device
from partitioner.formats.profile import LayerProfile, Profile
from partitioner.formats.specs import load_spec

__all__ = ["profile_graph", "profile_graph_of", "trace_layers"]

_LAYER_OPS = ("call_module", "call_function", "call_method")


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def trace_layers(model: nn.Module, leaf_modules: Sequence[type[nn.Module]] = ()
                 ) -> tuple[fx.GraphModule, list[fx.Node], tuple[tuple[int, int], ...]]:
    """The traced module, its layer nodes in order, and the edges between them."""
    graph = _Tracer(tuple(leaf_modules)).trace(model)
    gm = fx.GraphModule(model, graph)
    layers = [n for n in gm.graph.nodes if n.op in _LAYER_OPS]
    index = {n: i for i, n in enumerate(layers)}
    edges = sorted({(index[u], index[v]) for v in layers for u in v.all_input_nodes
                    if u in index})
    return gm, layers, tuple(edges)


def _tensors(x: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    fx.node.map_aggregate(x, lambda t: out.append(t) if isinstance(t, torch.Tensor) else None)
    return out


def _nbytes(x: Any) -> float:
    return float(sum(t.numel() * t.element_size() for t in _tensors(x)))


def _detached(x: Any) -> Any:
    """Copies of the tensors in x that need their own gradient, as a stage's inputs do."""
    def leaf(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return t.detach().requires_grad_(t.is_floating_point())
        return t
    return fx.node.map_aggregate(x, leaf)


def _runner(gm: fx.GraphModule, node: fx.Node) -> Callable[..., Any]:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))
    if node.op == "call_method":
        return lambda self, *a, **k: getattr(self, str(node.target))(*a, **k)
    return node.target  # type: ignore[return-value]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn: Callable[..., Any], args: Any, kwargs: Any, params: list[torch.Tensor],
             repeats: int, device: torch.device) -> tuple[float, float, float]:
    """(median forward ms, median backward ms, saved bytes) of one node on fixed inputs."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    fwd, bwd = [], []
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    for rep in range(repeats + 1):  # the first run warms up
        a, k = _detached(args), _detached(kwargs)
        _sync(device)
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*a, **k)
        _sync(device)
        mid = time.perf_counter()
        outs = [t for t in _tensors(out) if t.requires_grad]
        wrt = [t for t in _tensors((a, k)) if t.requires_grad] + params
        if outs and wrt:
            torch.autograd.grad(outs, wrt, [torch.ones_like(t) for t in outs],
                                allow_unused=True)
        _sync(device)
        if rep:
            fwd.append((mid - start) * 1e3)
            bwd.append((time.perf_counter() - mid) * 1e3 if outs and wrt else 0.0)
    return statistics.median(fwd), statistics.median(bwd), float(sum(saved.values()))


def _batch(sample: torch.Tensor, b: int) -> torch.Tensor:
    """b samples taken cyclically from the rows of ``sample`` (batch dimension 0)."""
    return sample[torch.arange(b, device=sample.device) % sample.shape[0]]


def profile_graph(model: nn.Module, sample: torch.Tensor,
                  microbatch_sizes: Iterable[int] = (1, 2, 4), *, repeats: int = 5,
                  leaf_modules: Sequence[type[nn.Module]] = (), name: str | None = None
                  ) -> Profile:
    """A ``gpipe-profile/1`` profile with ``edges`` of ``model`` fed batches drawn from
    ``sample`` (its dimension 0 is the batch), on the device ``sample`` lives on."""
    sizes = tuple(sorted(set(microbatch_sizes)))
    if not sizes or sizes[0] < 1 or repeats < 1:
        raise ValueError(f"microbatch_sizes {sizes} must be positive whole numbers and repeats "
                         f"{repeats} at least 1")
    gm, layers, edges = trace_layers(model, leaf_modules)
    owner: dict[int, int] = {}  # parameter storage -> the first layer that uses it
    layer_params: list[list[torch.Tensor]] = []
    for i, node in enumerate(layers):
        params: list[torch.Tensor] = list(gm.get_submodule(str(node.target)).parameters()) if (
            node.op == "call_module") else []
        params += [gm.get_parameter(str(u.target)) for u in node.all_input_nodes
                   if u.op == "get_attr" and isinstance(_attr(gm, u), nn.Parameter)]
        layer_params.append(params)
        for p in params:
            owner.setdefault(p.untyped_storage().data_ptr(), i)
    figures: dict[str, list[list[float]]] = {k: [[] for _ in layers] for k in
                                             ("fwd_ms", "bwd_ms", "in_bytes", "out_bytes",
                                              "saved_bytes")}
    was_training = model.training
    try:
        for b in sizes:
            interp = fx.Interpreter(gm, garbage_collect_values=False)
            with torch.no_grad():
                interp.run(_batch(sample, b))
            env: dict[fx.Node, Any] = interp.env
            for i, node in enumerate(layers):
                args = fx.node.map_arg(node.args, env.__getitem__)
                kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
                f, bw, saved = _measure(_runner(gm, node), args, kwargs, layer_params[i],
                                        repeats, sample.device)
                for key, value in (("fwd_ms", f), ("bwd_ms", bw), ("saved_bytes", saved),
                                   ("in_bytes", _nbytes((args, kwargs))),
                                   ("out_bytes", _nbytes(env[node]))):
                    figures[key][i].append(value)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    dtype = next((p.dtype for p in model.parameters()), sample.dtype)
    out_layers = []
    for i, node in enumerate(layers):
        param_bytes = sum(p.numel() * p.element_size() for p in layer_params[i]
                          if owner[p.untyped_storage().data_ptr()] == i)
        out_layers.append(LayerProfile(
            node.name, _type_name(gm, node), int(param_bytes),
            fwd_ms=tuple(figures["fwd_ms"][i]), bwd_ms=tuple(figures["bwd_ms"][i]),
            in_bytes=tuple(figures["in_bytes"][i]), out_bytes=tuple(figures["out_bytes"][i]),
            saved_bytes=tuple(figures["saved_bytes"][i])))
    return Profile(
        model=name or type(model).__name__, device=device_info(sample.device),
        dtype=str(dtype).removeprefix("torch."), microbatch_sizes=sizes,
        layers=tuple(out_layers), torch=torch.__version__,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        how=(f"executor/graph_profile.py: torch.fx trace, one layer per call node "
             f"(leaf modules: {[c.__name__ for c in leaf_modules] or 'torch defaults'}); each "
             f"node re-run alone on captured inputs, median of {repeats} runs after one "
             f"warm-up; saved_bytes from autograd's saved-tensor hooks"),
        input={"shape": list(sample.shape[1:]), "dtype": str(sample.dtype)},
        edges=edges)


def _attr(gm: fx.GraphModule, node: fx.Node) -> Any:
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def _type_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def profile_graph_of(model_spec: str, input_shape: Sequence[int], microbatch_sizes: Sequence[int],
                     *, leaf_modules: Sequence[str] = (), device: str = "cpu",
                     repeats: int = 5) -> Profile:
    """``profile_graph`` of the model a ``module:factory`` spec builds, fed random samples of
    ``input_shape`` (without the batch dimension), with the module classes ``leaf_modules``
    (specs too) kept whole; what ``partition-model profile-graph`` runs."""
    dev = resolve_device(device)
    factory = load_spec(model_spec, "--model")
    leaves = [load_spec(spec, "--leaf") for spec in leaf_modules]
    bad = [spec for spec, cls in zip(leaf_modules, leaves, strict=True)
           if not (isinstance(cls, type) and issubclass(cls, nn.Module))]
    if bad:
        raise TypeError(f"--leaf {bad[0]!r} is not an nn.Module class")
    model = factory() if callable(factory) else None
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {model_spec!r} must name a function or class returning an "
                        f"nn.Module, got {type(model).__name__}")
    sample = torch.randn(max(microbatch_sizes), *input_shape, device=dev)
    return profile_graph(model.to(dev), sample, microbatch_sizes, repeats=repeats,
                         leaf_modules=leaves, name=model_spec)
