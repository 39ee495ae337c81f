"""The graph fields of a profile: the values a layer outputs, edges that read some of them, ties.

    >>> p = Problems()
    >>> outs = parse_outputs([{"name": "add_3", "bytes": 64}], "layers[0]", 2, p)
    >>> outs[0], list(p)
    (OutputValue(name='add_3', bytes=(64.0, 64.0), grad=True), [])

A traced layer may pass several *values* on (fx node names such as ``add_3``), and its
consumers may each read a subset: an edge ``[u, v, [j, ...]]`` reads ``outputs[j]`` of layer
u (``[]``: an ordering-only edge that carries nothing), ``[u, v]`` reads all of u's output. A
*tied* parameter (e.g. an embedding shared with the LM head) is counted in the ``param_bytes``
of its first listed layer, the owner; the other layers that use it list it under ``tied``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from partitioner.formats.checks import Problems, is_number, show
from partitioner.formats.units import MAX_BYTES

__all__ = ["Edge", "OutputValue", "TiedParam", "edge_to_json", "output_to_json", "parse_edges",
           "parse_outputs", "parse_tied", "tied_to_json", "unique_names"]

#: One edge as the loader returns it: (src, dst, the indices of src's outputs it reads, or
#: None for the 2-element form that reads all of src's output).
Edge = tuple[int, int, "tuple[int, ...] | None"]


@dataclass(frozen=True)
class OutputValue:
    """One value a layer passes to others: ``OutputValue("add_3", (64.0,), grad=True)``; its
    bytes at each micro-batch size of the profile, and whether a gradient of it flows back."""

    name: str
    bytes: tuple[float, ...]
    grad: bool = True


@dataclass(frozen=True)
class TiedParam:
    """A parameter several layers use: ``TiedParam("wte.weight", 4096, (0, 13))``; its bytes
    are in ``param_bytes`` of ``layers[0]`` (the owner) only."""

    name: str
    bytes: int
    layers: tuple[int, ...]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_outputs(raw: object, path: str, n: int, p: Problems) -> tuple[OutputValue, ...]:
    """The ``outputs`` list of one layer (``path``: the layer's JSON path; n micro-batch
    sizes); the names' uniqueness across layers is ``unique_names``'s to check."""
    if not isinstance(raw, list):
        p.add(f"{path}.outputs", f"expected a list of {{name, bytes, grad}} objects, got "
                                 f"{show(raw)}")
        return ()
    outs = []
    for j, obj in enumerate(raw):
        at = f"{path}.outputs[{j}]"
        out = p.mapping(obj, at, "name, bytes, grad")
        p.keys(out, at, ("name", "bytes", "grad"), required=("name", "bytes"))
        size = out.get("bytes", 0)
        if is_number(size):
            sizes = (p.number(size, f"{at}.bytes"),) * n
        elif isinstance(size, list) and len(size) == n:
            sizes = tuple(p.number(x, f"{at}.bytes[{s}]") for s, x in enumerate(size))
        else:
            p.add(f"{at}.bytes", f"{show(size)} is not a number or a list of {n} numbers (one "
                                 f"per micro-batch size)")
            sizes = (0.0,) * n
        grad = out.get("grad", True)
        if not isinstance(grad, bool):
            p.add(f"{at}.grad", f"{show(grad)} is not true or false (whether a gradient of the "
                                f"value flows back)")
            grad = True
        outs.append(OutputValue(p.text(out.get("name", ""), f"{at}.name"), sizes, grad))
    return tuple(outs)


def unique_names(outputs: Sequence[tuple[OutputValue, ...] | None], p: Problems) -> None:
    """Every output name once across the profile; duplicates named with both paths."""
    seen: dict[str, str] = {}
    for i, outs in enumerate(outputs):
        for j, out in enumerate(outs or ()):
            at = f"layers[{i}].outputs[{j}].name"
            if out.name in seen:
                p.add(at, f"{out.name!r} is also {seen[out.name]}; value names must be unique "
                          f"across the profile (use the traced graph's node names)")
            else:
                seen[out.name] = at


def parse_edges(raw: object, num_layers: int, outputs: Sequence[tuple[OutputValue, ...] | None],
                p: Problems) -> list[Edge]:
    """``edges``: ``[src, dst]`` or ``[src, dst, [j, ...]]`` with src < dst, each pair once."""
    if not isinstance(raw, list):
        p.add("edges", f"expected a list of [src, dst] pairs, got {show(raw)}")
        return []
    edges: list[Edge] = []
    seen: set[tuple[int, int]] = set()
    for e, item in enumerate(raw):
        ok = (isinstance(item, list) and len(item) in (2, 3)
              and all(_is_int(x) for x in item[:2]))
        if not ok:
            p.add(f"edges[{e}]", f"{show(item)} is not a pair of layer indices [src, dst] (or "
                                 f"[src, dst, [output indices]])")
            continue
        src, dst = item[0], item[1]
        if not (0 <= src < num_layers and 0 <= dst < num_layers):
            p.add(f"edges[{e}]", f"{item!r} names a layer outside 0..{num_layers - 1}")
            continue
        if src >= dst:
            p.add(f"edges[{e}]", f"{item!r} goes from layer {src} to layer {dst}; edges must go "
                                 f"forward (src < dst) in a topological layer order, so a cycle "
                                 f"is impossible")
            continue
        if (src, dst) in seen:
            p.add(f"edges[{e}]", f"{item!r} appears twice; list each edge once")
            continue
        seen.add((src, dst))
        reads = _edge_reads(item[2], f"edges[{e}]", outputs[src], src, p) if len(item) == 3 \
            else None
        edges.append((src, dst, reads))
    return edges


def _edge_reads(raw: object, path: str, outs: tuple[OutputValue, ...] | None, src: int,
                p: Problems) -> tuple[int, ...] | None:
    if outs is None:
        p.add(path, f"reads outputs {show(raw)} of layer {src}, which lists no 'outputs'; give "
                    f"layer {src} its outputs or use the 2-element form [src, dst]")
        return None
    if not (isinstance(raw, list) and all(_is_int(j) for j in raw)):
        p.add(f"{path}[2]", f"{show(raw)} is not a list of indices into layer {src}'s outputs")
        return None
    bad = [j for j in raw if not 0 <= j < len(outs)]
    if bad:
        p.add(f"{path}[2]", f"indices {bad} are outside 0..{len(outs) - 1}, the {len(outs)} "
                            f"outputs of layer {src}")
    if len(set(raw)) != len(raw):
        p.add(f"{path}[2]", f"{raw!r} lists an output twice; list each once")
    return tuple(raw)


def parse_tied(raw: object, num_layers: int, p: Problems) -> tuple[TiedParam, ...]:
    """``tied``: ``[{"name", "bytes", "layers": [owner, user, ...]}]``, layers sorted, >= 2."""
    if not isinstance(raw, list):
        p.add("tied", f"expected a list of {{name, bytes, layers}} objects, got {show(raw)}")
        return ()
    tied, names = [], set()
    for t, obj in enumerate(raw):
        at = f"tied[{t}]"
        item = p.mapping(obj, at, "name, bytes, layers")
        p.keys(item, at, ("name", "bytes", "layers"), required=("name", "bytes", "layers"))
        name = p.text(item.get("name", ""), f"{at}.name")
        if name in names:
            p.add(f"{at}.name", f"{name!r} is listed twice; list each tied parameter once")
        names.add(name)
        size = p.number(item.get("bytes", 0), f"{at}.bytes", integer=True, high=MAX_BYTES)
        layers = item.get("layers", [])
        if not (isinstance(layers, list) and all(_is_int(i) for i in layers)):
            p.add(f"{at}.layers", f"{show(layers)} is not a list of layer indices")
            continue
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            p.add(f"{at}.layers", f"{bad} are outside 0..{num_layers - 1}")
        if len(layers) < 2:
            p.add(f"{at}.layers", f"{layers!r} names fewer than 2 layers; a tied parameter is "
                                  f"used by at least two (the owner first)")
        elif layers != sorted(set(layers)):
            p.add(f"{at}.layers", f"{layers!r} is not sorted or repeats a layer; list distinct "
                                  f"layers in increasing order (the first owns the parameter)")
        tied.append(TiedParam(name, int(size), tuple(layers)))
    return tuple(tied)


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def output_to_json(out: OutputValue) -> dict[str, Any]:
    obj: dict[str, Any] = {"name": out.name, "bytes": [_num(b) for b in out.bytes]}
    if not out.grad:
        obj["grad"] = False
    return obj


def edge_to_json(edge: tuple[int, int], reads: tuple[int, ...] | None) -> list[Any]:
    return [*edge, list(reads)] if reads is not None else list(edge)


def tied_to_json(tie: TiedParam) -> dict[str, Any]:
    return {"name": tie.name, "bytes": tie.bytes, "layers": list(tie.layers)}
