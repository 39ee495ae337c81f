"""The ``gpipe-profile/1`` format: per-layer time and memory at several micro-batch sizes.

    >>> prof = load_profile("h200/gpt2-medium")          # a shipped profile, by name
    >>> prof.num_layers, prof.microbatch_sizes
    (26, (1, 2, 4, 8, 16))

Validation collects every problem with its JSON path before raising one ``ProfileError``.

Per layer, one figure per micro-batch size: ``fwd_ms``, ``bwd_ms`` (the whole backward: input
and weight gradients), ``in_bytes``, ``out_bytes``, ``saved_bytes``; optional ``launch_ms``,
``peak_bytes`` and the split backward of zero-bubble schedules, ``bwd_input_ms`` (I: the
gradient of the layer's input, sent upstream at once) with ``bwd_weight_ms`` (W: the
gradients of its parameters, which may wait). The two halves come as a pair, a layer with one
and not the other is a problem; they may add up to a little more than ``bwd_ms`` (measured
apart, small layers pay each half's fixed costs), which is accepted. Without them the cost
model splits ``bwd_ms`` by its stated rule (``CostModel.layer_array``). Optional too, as a pair:
``saved_input_bytes`` and ``saved_output_bytes``, the parts of ``saved_bytes`` that are the
layer's own input and output (each at most ``saved_bytes``), which tell the memory model what
neighbouring layers and a stage's stashed input share (``cost.activations``). And a pair for
the split backward: ``held_for_w_bytes``, what the layer keeps from its I until its W (each
deferred linear's input and output gradient), and ``held_for_w_input_bytes``, the part of it
that is the layer's own input. At the top, an optional ``loss`` says what the loss function
keeps on the last stage (``profile_loss``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from partitioner.formats.checks import Problems, is_number, show
from partitioner.formats.jsonfile import decode_json, is_file, read_json
from partitioner.formats.profile_graph import (
    OutputValue,
    TiedParam,
    edge_to_json,
    output_to_json,
    parse_edges,
    parse_outputs,
    parse_tied,
    tied_to_json,
    unique_names,
)
from partitioner.formats.profile_loss import LossProfile, loss_to_json, parse_loss
from partitioner.formats.units import MAX_BYTES, MAX_MS

__all__ = [
    "DTYPE_BYTES",
    "FORMAT",
    "DeviceInfo",
    "LayerProfile",
    "OutputValue",
    "Profile",
    "ProfileError",
    "TiedParam",
    "load_profile",
    "profile_from_dict",
    "profile_to_dict",
    "save_profile",
    "shipped_profiles",
]

FORMAT = "gpipe-profile/1"
_PER_SIZE = ("fwd_ms", "bwd_ms", "in_bytes", "out_bytes", "saved_bytes")
_OPTIONAL_PER_SIZE = ("launch_ms", "peak_bytes", "bwd_input_ms", "bwd_weight_ms",
                      "saved_input_bytes", "saved_output_bytes", "held_for_w_bytes",
                      "held_for_w_input_bytes")
#: Optional per-size fields that come in pairs.
_PAIRS = (("bwd_input_ms", "bwd_weight_ms", "a split backward needs both halves (I and W)"),
          ("saved_input_bytes", "saved_output_bytes",
           "the memory model reads what a layer shares with both neighbours"),
          ("held_for_w_bytes", "held_for_w_input_bytes",
           "the memory model reads what a split layer keeps until W and how much of it is "
           "its input"))
#: Optional per-size parts, each at most the whole it is a part of.
_PARTS = (("saved_input_bytes", "saved_bytes"), ("saved_output_bytes", "saved_bytes"),
          ("held_for_w_input_bytes", "held_for_w_bytes"))
_LAYER_KEYS = {"name", "type", "param_bytes", *_PER_SIZE, *_OPTIONAL_PER_SIZE, "outputs",
               "extra"}
_REQUIRED_TOP = ("format", "model", "device", "dtype", "microbatch_sizes", "layers")
_TOP_KEYS = {*_REQUIRED_TOP, "torch", "created", "how", "input", "edges", "tied", "loss", "extra",
             "harness"}  # harness: the profiler's settings, written on top before 'extra'
_HIGH = {key: MAX_MS if key.endswith("_ms") else MAX_BYTES
         for key in (*_PER_SIZE, *_OPTIONAL_PER_SIZE)}
#: The largest micro-batch size a profile may list.
MAX_SIZE = 2**31
#: Bytes of one element of each dtype a profile may name.
DTYPE_BYTES = {"float64": 8, "float32": 4, "tfloat32": 4, "bfloat16": 2, "float16": 2,
               "float8": 1, "fp8": 1}


class ProfileError(ValueError):
    """A profile that breaks the format; ``problems`` lists each one with its JSON path. Made
    with a message alone (no problems), it is a file that could not be read at all."""

    def __init__(self, source: str, problems: Sequence[str] | None = None) -> None:
        if problems is None:
            self.problems = [source]
            super().__init__(source)
            return
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(
            f"{source} is not a valid {FORMAT} profile ({len(self.problems)} problem(s)):\n"
            f"  {shown}{more}\nFix the values named above (README, 'Formats', describes "
            f"every field)."
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
    bwd_input_ms: tuple[float, ...] | None = None  # split backward: the input gradient (I)
    bwd_weight_ms: tuple[float, ...] | None = None  # and the weight gradient (W), measured
    saved_input_bytes: tuple[float, ...] | None = None  # of saved_bytes: its input's storages
    saved_output_bytes: tuple[float, ...] | None = None  # and its output's
    held_for_w_bytes: tuple[float, ...] | None = None  # split: kept from I until W
    held_for_w_input_bytes: tuple[float, ...] | None = None  # of that: its input's storages
    extra: Mapping[str, Any] = field(default_factory=dict)
    outputs: tuple[OutputValue, ...] | None = None  # the values it passes on; None: one, whole


@dataclass(frozen=True)
class Profile:
    """A whole model's profile. ``edges`` is None for a chain (layer i feeds layer i+1);
    ``edge_values[e]`` (None, or None per edge: the 2-element form) lists the outputs of
    ``edges[e]``'s source that its destination reads; ``tied`` the shared parameters."""

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
    edge_values: tuple[tuple[int, ...] | None, ...] | None = None
    tied: tuple[TiedParam, ...] = ()
    loss: LossProfile | None = None  # what the loss keeps on the last stage (profile_loss)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def sha256(self) -> str:
        """Digest of the canonical JSON form; a plan records it to refuse other profiles."""
        text = json.dumps(profile_to_dict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# -- validation ---------------------------------------------------------------------------------

def _parse_array(obj: Mapping[str, Any], key: str, path: str, n: int, problems: Problems,
                 high: float) -> tuple[float, ...]:
    arr = obj.get(key)
    if is_number(arr) and key in _OPTIONAL_PER_SIZE:  # one figure for every size
        return (problems.number(arr, f"{path}.{key}", high=high),) * n
    if not isinstance(arr, list):
        problems.add(f"{path}.{key}", f"expected a list of {n} numbers (one per micro-batch "
                                      f"size), got {show(arr)}")
        return (0.0,) * n
    if len(arr) != n:
        problems.add(f"{path}.{key}", f"has {len(arr)} values but microbatch_sizes has {n}; "
                                      f"give one value per micro-batch size")
    values = tuple(problems.number(x, f"{path}.{key}[{i}]", high=high) for i, x in enumerate(arr))
    return (values + (0.0,) * n)[:n]


def _parse_layer(obj: object, i: int, n: int, problems: Problems) -> LayerProfile:
    path = f"layers[{i}]"
    layer = problems.mapping(obj, path, "a layer: name, param_bytes, fwd_ms, ...")
    problems.keys(layer, path, _LAYER_KEYS, required=("name", "param_bytes", *_PER_SIZE))
    arrays = {k: _parse_array(layer, k, path, n, problems, _HIGH[k]) if k in layer else (0.0,) * n
              for k in _PER_SIZE}
    optional = {k: _parse_array(layer, k, path, n, problems, _HIGH[k])
                if layer.get(k) is not None else None for k in _OPTIONAL_PER_SIZE}
    param = problems.number(layer.get("param_bytes", 0), f"{path}.param_bytes", integer=True)
    for one, two, why in _PAIRS:
        halves = [k for k in (one, two) if optional[k] is not None]
        if len(halves) == 1:
            other = two if halves[0] == one else one
            problems.add(f"{path}.{other}", f"missing, but {halves[0]} is given: {why}, one "
                                            f"per micro-batch size; give {other} too, or drop "
                                            f"{halves[0]}")
    for key, of in _PARTS:
        part, wholes = optional[key], arrays.get(of) or optional.get(of)
        for j, (x, whole) in enumerate(zip(part or (), wholes or (), strict=False)):
            if x > whole:
                problems.add(f"{path}.{key}[{j}]", f"is {x:g} bytes, more than {of} "
                                                   f"({whole:g}) of which it is a part; give "
                                                   f"at most {whole:g}")
    extra = layer.get("extra", {})
    outputs = (parse_outputs(layer["outputs"], path, n, problems)
               if layer.get("outputs") is not None else None)
    return LayerProfile(
        name=problems.text(layer.get("name", str(i)), f"{path}.name", str(i)),
        type=problems.text(layer.get("type", ""), f"{path}.type"),
        param_bytes=int(param),
        fwd_ms=arrays["fwd_ms"],
        bwd_ms=arrays["bwd_ms"],
        in_bytes=arrays["in_bytes"],
        out_bytes=arrays["out_bytes"],
        saved_bytes=arrays["saved_bytes"],
        launch_ms=optional["launch_ms"],
        peak_bytes=optional["peak_bytes"],
        bwd_input_ms=optional["bwd_input_ms"],
        bwd_weight_ms=optional["bwd_weight_ms"],
        saved_input_bytes=optional["saved_input_bytes"],
        saved_output_bytes=optional["saved_output_bytes"],
        held_for_w_bytes=optional["held_for_w_bytes"],
        held_for_w_input_bytes=optional["held_for_w_input_bytes"],
        extra=problems.mapping(extra, f"{path}.extra", "free-form data"),
        outputs=outputs,
    )


def _parse_sizes(raw: object, problems: Problems) -> list[int]:
    if not isinstance(raw, list) or not raw:
        problems.add("microbatch_sizes", f"expected a non-empty list of sizes, got {show(raw)}")
        return []
    sizes: list[int] = []
    for i, s in enumerate(raw):
        if not (isinstance(s, int) and not isinstance(s, bool)) or not 1 <= s <= MAX_SIZE:
            problems.add(f"microbatch_sizes[{i}]", f"{show(s)} is not a positive whole number "
                                                   f"(at most {MAX_SIZE})")
            continue
        if sizes and s <= sizes[-1]:
            word = "repeats" if s == sizes[-1] else "is smaller than"
            problems.add(f"microbatch_sizes[{i}]", f"{s} {word} the size before it "
                                                   f"({sizes[-1]}); sizes must be strictly "
                                                   f"increasing")
            continue
        sizes.append(s)
    return sizes


def profile_from_dict(data: object, source: str = "profile") -> Profile:
    """Validate a decoded JSON object and build a ``Profile``; raise ``ProfileError`` listing all
    problems.

        >>> profile_from_dict({"format": "x"})
        Traceback (most recent call last):
        ...
        partitioner.formats.profile.ProfileError: profile is not a valid gpipe-profile/1 profile ...
    """
    problems = Problems()
    if not isinstance(data, dict):
        raise ProfileError(source, [f"(top): expected a JSON object, got {type(data).__name__}"])
    problems.keys(data, "(top)", _TOP_KEYS, required=_REQUIRED_TOP)
    if "format" in data and data["format"] != FORMAT:
        problems.add("format", f"{show(data['format'])} is not {FORMAT!r}")
    dev = problems.mapping(data.get("device", {}), "device", "name, kind, memory_bytes")
    problems.keys(dev, "device", ("name", "kind", "memory_bytes"), required=(
        ("memory_bytes",) if "device" in data else ()))
    mem = problems.number(dev.get("memory_bytes", 1), "device.memory_bytes", low=1,
                          integer=True, default=1)
    device = DeviceInfo(problems.text(dev.get("name", "unknown"), "device.name"),
                        problems.text(dev.get("kind", "unknown"), "device.kind"), int(mem))
    dtype = problems.text(data.get("dtype", "float32"), "dtype", "float32")
    if dtype.removeprefix("torch.") not in DTYPE_BYTES:
        problems.add("dtype", f"{show(dtype)} is not one of {', '.join(sorted(DTYPE_BYTES))}")
    sizes = _parse_sizes(data.get("microbatch_sizes", [1]), problems)
    n = len(data["microbatch_sizes"]) if isinstance(data.get("microbatch_sizes"), list) else 0
    layers_raw = data.get("layers", [])
    if not isinstance(layers_raw, list) or not layers_raw:
        problems.add("layers", f"expected a non-empty list of layer objects, got "
                               f"{show(layers_raw)}")
        layers_raw = []
    layers = tuple(_parse_layer(obj, i, n, problems) for i, obj in enumerate(layers_raw))
    unique_names([lay.outputs for lay in layers], problems)
    edges, edge_values = None, None
    if data.get("edges") is not None:
        parsed = parse_edges(data["edges"], len(layers), [lay.outputs for lay in layers],
                             problems)
        edges = tuple((u, v) for u, v, _ in parsed)
        if any(reads is not None for _, _, reads in parsed):
            edge_values = tuple(reads for _, _, reads in parsed)
    tied = (parse_tied(data["tied"], len(layers), problems) if data.get("tied") is not None
            else ())
    loss = parse_loss(data["loss"], n, problems) if data.get("loss") is not None else None
    if edges is not None:  # the exact activation terms are a chain's (cost.activations)
        chain_only = [f"layers[{i}].saved_input_bytes" for i, lay in enumerate(layers)
                      if lay.saved_input_bytes is not None][:1]
        for path in chain_only:
            problems.add(path, "the memory model reads it on a chain profile only (without "
                               "edges), and this profile has edges; drop it, or the edges")
    extra = dict(problems.mapping(data.get("extra", {}), "extra", "free-form data"))
    if "harness" in data:  # profiles written before 'extra' had the profiler's settings on top
        extra.setdefault("harness", data["harness"])
    texts = {key: problems.text(data.get(key, default), key) for key, default in (
        ("model", ""), ("torch", "unknown"), ("created", ""), ("how", ""))}
    inputs = data.get("input")
    if inputs is not None:
        inputs = problems.mapping(inputs, "input", "a description of the model's input")
    if problems:
        raise ProfileError(source, problems)
    return Profile(
        model=texts["model"],
        device=device,
        dtype=dtype,
        microbatch_sizes=tuple(sizes),
        layers=layers,
        torch=texts["torch"],
        created=texts["created"],
        how=texts["how"],
        input=inputs,
        edges=edges,
        extra=extra,
        edge_values=edge_values,
        tied=tied,
        loss=loss,
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
        if lay.outputs is not None:
            obj["outputs"] = [output_to_json(out) for out in lay.outputs]
        if lay.extra:
            obj["extra"] = dict(lay.extra)
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
        reads = prof.edge_values or (None,) * len(prof.edges)
        out["edges"] = [edge_to_json(e, r) for e, r in zip(prof.edges, reads, strict=True)]
    if prof.tied:
        out["tied"] = [tied_to_json(t) for t in prof.tied]
    if prof.loss is not None:
        out["loss"] = loss_to_json(prof.loss)
    if prof.extra:
        out["extra"] = dict(prof.extra)
    return out


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped in the ``profiles`` package, e.g. ``'h200/gpt2-medium'``."""
    root = resources.files("profiles")
    names = []
    for folder in root.iterdir():
        if folder.is_dir() and not folder.name.startswith(("_", ".")) and folder.name != "devices":
            names += [f"{folder.name}/{f.name[:-5]}" for f in folder.iterdir()
                      if f.name.endswith(".json")]
    return sorted(names)


def load_profile(path_or_name: str | Path) -> Profile:
    """Load and validate a profile from a file path or a shipped name such as ``h200/resnet50``."""
    if is_file(path_or_name):
        data = read_json(path_or_name, "profile", ProfileError)
        return profile_from_dict(data, str(path_or_name))
    name = str(path_or_name).removesuffix(".json")
    if name in shipped_profiles():
        res = resources.files("profiles").joinpath(*f"{name}.json".split("/"))
        data = decode_json(res.read_bytes, f"shipped profile {name}", ProfileError)
        return profile_from_dict(data, f"shipped profile {name}")
    raise FileNotFoundError(
        f"profile {str(path_or_name)!r} is neither a file nor a shipped profile; "
        f"give a path to a {FORMAT} JSON file or one of: {', '.join(shipped_profiles())}"
    )


def save_profile(prof: Profile, path: str | Path) -> None:
    """Write a profile as indented JSON (validated again on load)."""
    Path(path).write_text(json.dumps(profile_to_dict(prof), indent=1) + "\n")
