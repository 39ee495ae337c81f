"""The ``gpipe-profile/1`` format: per-layer time and memory at several micro-batch sizes.

    >>> prof = load_profile("h200/gpt2-medium")          # a shipped profile, by name
    >>> prof.num_layers, prof.microbatch_sizes
    (26, (1, 2, 4, 8, 16))

Validation collects every problem with its JSON path before raising one ``ProfileError``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT",
    "DeviceInfo",
    "LayerProfile",
    "Profile",
    "ProfileError",
    "load_profile",
    "profile_from_dict",
    "profile_to_dict",
    "save_profile",
    "shipped_profiles",
]

FORMAT = "gpipe-profile/1"
_PER_SIZE = ("fwd_ms", "bwd_ms", "in_bytes", "out_bytes", "saved_bytes")
_OPTIONAL_PER_SIZE = ("launch_ms", "peak_bytes")
_LAYER_KEYS = {"name", "type", "param_bytes", *_PER_SIZE, *_OPTIONAL_PER_SIZE}
_TOP_KEYS = {"format", "model", "device", "dtype", "torch", "created", "microbatch_sizes",
             "layers", "how", "input", "edges"}


class ProfileError(ValueError):
    """A profile that breaks the format; ``problems`` lists each one with its JSON path."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(
            f"{source} is not a valid {FORMAT} profile ({len(self.problems)} problem(s)):\n"
            f"  {shown}{more}\nFix the values named above (see DESIGN.md, 'Profile format')."
        )


@dataclass(frozen=True)
class DeviceInfo:
    """The device a profile was measured on: ``DeviceInfo("NVIDIA H200", "cuda", 150754820096)``."""

    name: str
    kind: str
    memory_bytes: int


@dataclass(frozen=True)
class LayerProfile:
    """One layer's measurements; every tuple has one entry per micro-batch size of the profile.

        >>> LayerProfile("0", "Linear", 4096, (1.0,), (2.0,), (64,), (64,), (64,)).fwd_ms
        (1.0,)
    """

    name: str
    type: str
    param_bytes: int
    fwd_ms: tuple[float, ...]
    bwd_ms: tuple[float, ...]
    in_bytes: tuple[float, ...]
    out_bytes: tuple[float, ...]
    saved_bytes: tuple[float, ...]
    launch_ms: tuple[float, ...] | None = None
    peak_bytes: tuple[float, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    """A whole model's profile. ``edges`` is None for a chain (layer i feeds layer i+1)."""

    model: str
    device: DeviceInfo
    dtype: str
    microbatch_sizes: tuple[int, ...]
    layers: tuple[LayerProfile, ...]
    torch: str = "unknown"
    created: str = ""
    how: str = ""
    input: Mapping[str, Any] | None = None
    edges: tuple[tuple[int, int], ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def sha256(self) -> str:
        """Digest of the canonical JSON form; a plan records it to refuse other profiles."""
        text = json.dumps(profile_to_dict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# -- validation ---------------------------------------------------------------------------------

def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_number(x: object, path: str, problems: list[str], integer: bool = False) -> float:
    if not _is_number(x):
        problems.append(f"{path}: {x!r} is not a number")
        return 0.0
    v = float(x)  # type: ignore[arg-type]
    if not math.isfinite(v):
        problems.append(f"{path}: {x!r} is not finite")
        return 0.0
    if v < 0:
        problems.append(f"{path}: {x!r} is negative")
    if integer and v != int(v):
        problems.append(f"{path}: {x!r} is not a whole number")
    return v


def _check_array(
    obj: Mapping[str, Any], key: str, path: str, n: int, problems: list[str]
) -> tuple[float, ...]:
    arr = obj.get(key)
    if not isinstance(arr, list):
        problems.append(f"{path}.{key}: expected a list of {n} numbers, got {arr!r}"[:200])
        return (0.0,) * n
    if len(arr) != n:
        problems.append(
            f"{path}.{key}: has {len(arr)} values but microbatch_sizes has {n}; "
            f"give one value per micro-batch size"
        )
    return tuple(_check_number(x, f"{path}.{key}[{i}]", problems) for i, x in enumerate(arr))


def _parse_layer(obj: object, i: int, n: int, problems: list[str]) -> LayerProfile:
    path = f"layers[{i}]"
    if not isinstance(obj, dict):
        problems.append(f"{path}: expected an object, got {type(obj).__name__}")
        obj = {}
    for key in ("name", "param_bytes", *_PER_SIZE):
        if key not in obj:
            problems.append(f"{path}: missing required field {key!r}")
    arrays = {k: _check_array(obj, k, path, n, problems) for k in _PER_SIZE if k in obj}
    optional: dict[str, tuple[float, ...] | None] = {}
    for key in _OPTIONAL_PER_SIZE:
        val = obj.get(key)
        if val is None:
            optional[key] = None
        elif _is_number(val):  # one figure for every size
            optional[key] = (_check_number(val, f"{path}.{key}", problems),) * n
        else:
            optional[key] = _check_array(obj, key, path, n, problems)
    param = _check_number(obj.get("param_bytes", 0), f"{path}.param_bytes", problems, True)
    return LayerProfile(
        name=str(obj.get("name", i)),
        type=str(obj.get("type", "")),
        param_bytes=int(param),
        fwd_ms=arrays.get("fwd_ms", (0.0,) * n),
        bwd_ms=arrays.get("bwd_ms", (0.0,) * n),
        in_bytes=arrays.get("in_bytes", (0.0,) * n),
        out_bytes=arrays.get("out_bytes", (0.0,) * n),
        saved_bytes=arrays.get("saved_bytes", (0.0,) * n),
        launch_ms=optional["launch_ms"],
        peak_bytes=optional["peak_bytes"],
        extra={k: v for k, v in obj.items() if k not in _LAYER_KEYS},
    )


def _parse_edges(raw: object, num_layers: int, problems: list[str]) -> tuple[tuple[int, int], ...]:
    if not isinstance(raw, list):
        problems.append(f"edges: expected a list of [src, dst] pairs, got {type(raw).__name__}")
        return ()
    edges: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for e, pair in enumerate(raw):
        ok = (isinstance(pair, list) and len(pair) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in pair))
        if not ok:
            problems.append(f"edges[{e}]: {pair!r} is not a pair of layer indices [src, dst]")
            continue
        src, dst = pair
        if not (0 <= src < num_layers and 0 <= dst < num_layers):
            problems.append(f"edges[{e}]: {pair!r} names a layer outside 0..{num_layers - 1}")
        elif src >= dst:
            problems.append(
                f"edges[{e}]: {pair!r} goes from layer {src} to layer {dst}; edges must go "
                f"forward (src < dst) in a topological layer order, so a cycle is impossible"
            )
        elif (src, dst) in seen:
            problems.append(f"edges[{e}]: {pair!r} appears twice; list each edge once")
        else:
            seen.add((src, dst))
            edges.append((src, dst))
    return tuple(edges)


def profile_from_dict(data: object, source: str = "profile") -> Profile:
    """Validate a decoded JSON object and build a ``Profile``; raise ``ProfileError`` listing all
    problems.

        >>> profile_from_dict({"format": "x"})
        Traceback (most recent call last):
        ...
        partitioner.profile.ProfileError: profile is not a valid gpipe-profile/1 profile ...
    """
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ProfileError(source, [f"(top): expected a JSON object, got {type(data).__name__}"])
    if data.get("format") != FORMAT:
        problems.append(f"format: {data.get('format')!r} is not {FORMAT!r}")
    for key in ("model", "device", "dtype", "microbatch_sizes", "layers"):
        if key not in data:
            problems.append(f"(top): missing required field {key!r}")
    dev = data.get("device", {})
    if not isinstance(dev, dict):
        problems.append(f"device: expected an object with name, kind, memory_bytes, got {dev!r}")
        dev = {}
    mem = _check_number(dev.get("memory_bytes", 0), "device.memory_bytes", problems, True)
    if "device" in data and "memory_bytes" not in dev:
        problems.append("device: missing 'memory_bytes' (the device's memory, in bytes)")
    device = DeviceInfo(str(dev.get("name", "unknown")), str(dev.get("kind", "unknown")), int(mem))

    sizes_raw = data.get("microbatch_sizes", [])
    sizes: list[int] = []
    if not isinstance(sizes_raw, list) or not sizes_raw:
        problems.append(f"microbatch_sizes: expected a non-empty list of sizes, got {sizes_raw!r}")
        sizes_raw = []
    for i, s in enumerate(sizes_raw):
        if not (isinstance(s, int) and not isinstance(s, bool)) or s < 1:
            problems.append(f"microbatch_sizes[{i}]: {s!r} is not a positive whole number")
            continue
        if sizes and s <= sizes[-1]:
            word = "repeats" if s == sizes[-1] else "is smaller than"
            problems.append(
                f"microbatch_sizes[{i}]: {s} {word} the size before it ({sizes[-1]}); "
                f"sizes must be strictly increasing"
            )
        sizes.append(s)
    n = len(sizes_raw)

    layers_raw = data.get("layers", [])
    if not isinstance(layers_raw, list) or not layers_raw:
        problems.append("layers: expected a non-empty list of layer objects")
        layers_raw = []
    layers = tuple(_parse_layer(obj, i, n, problems) for i, obj in enumerate(layers_raw))
    edges = None
    if data.get("edges") is not None:
        edges = _parse_edges(data["edges"], len(layers), problems)
    if problems:
        raise ProfileError(source, problems)
    return Profile(
        model=str(data["model"]),
        device=device,
        dtype=str(data["dtype"]),
        microbatch_sizes=tuple(sizes),
        layers=layers,
        torch=str(data.get("torch", "unknown")),
        created=str(data.get("created", "")),
        how=str(data.get("how", "")),
        input=data.get("input"),
        edges=edges,
        extra={k: v for k, v in data.items() if k not in _TOP_KEYS},
    )


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def profile_to_dict(prof: Profile) -> dict[str, Any]:
    """The JSON object of a profile; ``profile_from_dict(profile_to_dict(p)) == p``."""
    layers = []
    for lay in prof.layers:
        obj: dict[str, Any] = {"name": lay.name, "type": lay.type, "param_bytes": lay.param_bytes}
        for key in _PER_SIZE + _OPTIONAL_PER_SIZE:
            val = getattr(lay, key)
            if val is not None:
                obj[key] = [_num(v) for v in val]
        obj.update(lay.extra)
        layers.append(obj)
    out: dict[str, Any] = {
        "format": FORMAT,
        "model": prof.model,
        "device": {"name": prof.device.name, "kind": prof.device.kind,
                   "memory_bytes": prof.device.memory_bytes},
        "dtype": prof.dtype,
        "torch": prof.torch,
        "created": prof.created,
    }
    if prof.how:
        out["how"] = prof.how
    if prof.input is not None:
        out["input"] = dict(prof.input)
    out["microbatch_sizes"] = list(prof.microbatch_sizes)
    out["layers"] = layers
    if prof.edges is not None:
        out["edges"] = [list(e) for e in prof.edges]
    out.update(prof.extra)
    return out


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped in the ``profiles`` package, e.g. ``'h200/gpt2-medium'``."""
    root = resources.files("profiles")
    names = []
    for folder in root.iterdir():
        if folder.is_dir() and not folder.name.startswith(("_", ".")):
            names += [f"{folder.name}/{f.name[:-5]}" for f in folder.iterdir()
                      if f.name.endswith(".json")]
    return sorted(names)


def _read_text(path_or_name: str | Path) -> tuple[str, str]:
    path = Path(path_or_name)
    if path.is_file():
        return path.read_text(), str(path)
    name = str(path_or_name).removesuffix(".json")
    res = resources.files("profiles").joinpath(*f"{name}.json".split("/"))
    if res.is_file():
        return res.read_text(), f"shipped profile {name}"
    raise FileNotFoundError(
        f"profile {str(path_or_name)!r} is neither a file nor a shipped profile; "
        f"give a path to a {FORMAT} JSON file or one of: {', '.join(shipped_profiles())}"
    )


def load_profile(path_or_name: str | Path) -> Profile:
    """Load and validate a profile from a file path or a shipped name such as ``h200/resnet50``."""
    text, source = _read_text(path_or_name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(source, [f"(file): not JSON: {exc}"]) from None
    return profile_from_dict(data, source)


def save_profile(prof: Profile, path: str | Path) -> None:
    """Write a profile as indented JSON (validated again on load)."""
    Path(path).write_text(json.dumps(profile_to_dict(prof), indent=1) + "\n")
