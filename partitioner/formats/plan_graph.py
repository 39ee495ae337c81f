"""A graph plan's extra fields: the messages between stages, where tied parameters live, the trace.

    >>> p = Problems()
    >>> parse_messages([{"src": 0, "dst": 2, "values": ["add_5"], "bytes": 64,
    ...                  "grad_bytes": 64}], 3, p)
    {(0, 2): Message(values=('add_5',), bytes=64.0, grad_bytes=64.0)}

``messages`` (at the plan's largest micro-batch size) say what each stage sends which later
stage, value by value (``cost.messages.stage_messages``); the executor sends exactly these.
``tied`` names each tied parameter's stages; ``trace`` is the executor's own record of how it
traced the model (copied from the profile's ``extra.trace``), passed on untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from partitioner.formats.checks import Problems, show
from partitioner.formats.values import Message

__all__ = ["messages_to_json", "parse_messages", "parse_tied_stages", "tied_to_json"]

_MESSAGE_KEYS = ("src", "dst", "values", "bytes", "grad_bytes")


def parse_messages(raw: object, stages: int, p: Problems) -> dict[tuple[int, int], Message]:
    """``messages``: ``[{"src", "dst", "values", "bytes", "grad_bytes"}]``, src < dst < K,
    each pair once."""
    if not isinstance(raw, list):
        p.add("messages", f"expected a list of {{src, dst, values, bytes, grad_bytes}} objects, "
                          f"got {show(raw)}")
        return {}
    out: dict[tuple[int, int], Message] = {}
    for e, item in enumerate(raw):
        at = f"messages[{e}]"
        obj = p.mapping(item, at, "src, dst, values, bytes, grad_bytes")
        p.keys(obj, at, _MESSAGE_KEYS, required=("src", "dst", "values", "bytes"))
        top = max(stages - 1, 0)
        src = p.whole(obj.get("src", 0), f"{at}.src", high=top)
        dst = p.whole(obj.get("dst", 0), f"{at}.dst", high=top)
        if "src" in obj and "dst" in obj and src >= dst:
            p.add(at, f"src {src} is not before dst {dst}; a message goes forward to a later "
                      f"stage (its gradient comes back)")
        if (src, dst) in out:
            p.add(at, f"the pair {src} -> {dst} is listed twice; list each pair once")
        names = obj.get("values", [])
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            p.add(f"{at}.values", f"{show(names)} is not a list of value names")
            names = []
        size = p.number(obj.get("bytes", 0), f"{at}.bytes")
        grad = p.number(obj.get("grad_bytes", 0), f"{at}.grad_bytes")
        out[src, dst] = Message(tuple(names), size, grad)
    return out


def parse_tied_stages(raw: object, stages: int, p: Problems) -> dict[str, tuple[int, ...]]:
    """``tied``: ``[{"name", "stages": [k, ...]}]``, stages sorted, each in 0..K-1."""
    if not isinstance(raw, list):
        p.add("tied", f"expected a list of {{name, stages}} objects, got {show(raw)}")
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for t, item in enumerate(raw):
        at = f"tied[{t}]"
        obj = p.mapping(item, at, "name, stages")
        p.keys(obj, at, ("name", "stages"), required=("name", "stages"))
        name = p.text(obj.get("name", ""), f"{at}.name")
        if name in out:
            p.add(f"{at}.name", f"{name!r} is listed twice; list each tied parameter once")
        held = obj.get("stages", [])
        ok = isinstance(held, list) and held and all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k < stages for k in held)
        if not ok or held != sorted(set(held)):
            p.add(f"{at}.stages", f"{show(held)} is not a sorted list of distinct stages in "
                                  f"0..{stages - 1}")
            continue
        out[name] = tuple(held)
    return out


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def messages_to_json(messages: Mapping[tuple[int, int], Message]) -> list[dict[str, Any]]:
    return [{"src": src, "dst": dst, "values": list(msg.values), "bytes": _num(msg.bytes),
             "grad_bytes": _num(msg.grad_bytes)} for (src, dst), msg in sorted(messages.items())]


def tied_to_json(tied: Mapping[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    return [{"name": name, "stages": list(held)} for name, held in tied.items()]
