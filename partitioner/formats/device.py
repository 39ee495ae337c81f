"""Device models (``gpipe-device/1``): how a layer timed alone runs inside a training step.

    >>> dm = load_device_model("h200")
    >>> dm.name, dm.host_forward < dm.host_recompute
    ('h200', True)
    >>> load_device_model("h300")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: device model 'h300' is neither a file nor a shipped device model; ...

A profile times each layer alone, the device synchronised around it. On a GPU the host issues
kernels and the device runs them, and inside a step the host runs ahead: a layer costs the
larger of the host's time to issue it and the device's time to run it, not their sum, and not
what the layer took alone (that is the larger of the two plus the harness's own costs). A
device model says, in a few fitted figures, how to get both from the alone times
(``cost.instep`` applies them; ``cost.devicefit`` fits them to measured whole steps):

- ``host_forward``, ``host_backward``, ``host_recompute``: the host's time to issue a layer's
  forward, backward, and the forward a recomputing backward re-runs (under activation
  checkpointing, with its hooks), as multiples of the layer's *launch floor*: its profiled
  ``launch_ms`` where the profile has it, else the least time it took alone at any size (the
  floor a launch-bound layer sits on).
- ``device_scale``: the device's time in a step against alone (clocks under sustained load,
  colder caches, the loss the profile does not time).
- ``small_work_exponent``: below the sizes where a layer was device-bound alone, its device time
  falls as ``(b / b0) ** exponent`` (1: in proportion to the work; less: small work runs less
  efficiently).

The work figures describe the device for profiles made without it (``cost.worktime``: a
layer's time alone from its FLOPs, bytes moved and kernels): ``peak_tflops`` per dtype,
``memory_gbps``, and, fitted to measured profiles, ``half_work_gflop`` (the work at which a
kernel's compute reaches half the peak rate), ``memory_efficiency`` (the share of
``memory_gbps`` memory traffic achieves), ``conv_efficiency`` (the share of the peak that
convolutions reach), ``layer_launch_ms``, ``kernel_launch_ms`` and
``backward_kernel_launch_ms`` (what a layer and each of its forward or backward kernels cost
to launch when timed alone) and ``view_launch_ms`` (each op that launches no kernel). ``source`` says
whether the figures were fitted to measurements (``fitted``) or taken from a vendor's
published figures (``published``, the fitted ones then borrowed from a fitted model, as
``how`` says).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from partitioner.formats.checks import Problems
from partitioner.formats.jsonfile import decode_json, is_file, read_json

__all__ = ["DEVICE_FORMAT", "IN_STEP_HOW", "DeviceModel", "DeviceModelError", "device_model_for",
           "device_model_from_dict", "device_model_to_dict", "load_device_model",
           "save_device_model", "shipped_device_models"]

DEVICE_FORMAT = "gpipe-device/1"
_FOLDER = "devices"  # under the ``profiles`` package
_HOST = ("host_forward", "host_backward", "host_recompute")
_FITTED = (*_HOST, "device_scale", "small_work_exponent")
_WORK = ("memory_gbps", "half_work_gflop", "memory_efficiency", "conv_efficiency",
         "layer_launch_ms", "kernel_launch_ms", "backward_kernel_launch_ms", "view_launch_ms")
_UNIT = ("memory_efficiency", "conv_efficiency")  # shares, default 1
_KEYS = ("format", "name", "device_names", "kind", "memory_bytes", "source", *_FITTED, "peak_tflops", *_WORK,
         "how", "fit", "extra")
MAX_FACTOR = 100.0
#: What a profile's ``how`` says (chain or graph) when its layers were timed inside passes of
#: the whole model (``executor.profiling.how`` writes it from this constant).
IN_STEP_HOW = "timed inside forward+backward passes of the whole model"


class DeviceModelError(ValueError):
    """A device model file that breaks the format."""


@dataclass(frozen=True)
class DeviceModel:
    """The figures of one device model (see the module's docstring for what each means)."""

    name: str
    host_forward: float = 1.0
    host_backward: float = 1.0
    host_recompute: float = 1.0
    device_scale: float = 1.0
    small_work_exponent: float = 1.0
    device_names: tuple[str, ...] = ()
    kind: str = "cuda"
    memory_bytes: int = 0
    source: str = "fitted"
    peak_tflops: tuple[tuple[str, float], ...] = ()
    memory_gbps: float = 0.0
    half_work_gflop: float = 0.0
    memory_efficiency: float = 1.0
    conv_efficiency: float = 1.0
    layer_launch_ms: float = 0.0
    kernel_launch_ms: float = 0.0
    backward_kernel_launch_ms: float = 0.0
    view_launch_ms: float = 0.0
    how: str = ""
    fit: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        p = Problems()
        _check_figures({k: getattr(self, k) for k in _FITTED}, p, "device model")
        if p:
            raise DeviceModelError(f"device model {self.name!r}: " + "; ".join(p))

    def with_figures(self, **figures: float) -> DeviceModel:
        """This model with other fitted figures (``host_forward=...``), the fit record dropped."""
        data = {**asdict(self), **figures, "fit": ()}
        return DeviceModel(**data)

    def describe(self) -> str:
        """One line: the figures, e.g. for a plan's table of assumptions."""
        return (f"device model {self.name}: host issues F/B/recompute in {self.host_forward:.3g}/"
                f"{self.host_backward:.3g}/{self.host_recompute:.3g} x the launch floor, device "
                f"{self.device_scale:.3g} x alone, small work ^{self.small_work_exponent:.3g}")


def _check_figures(figures: Mapping[str, object], p: Problems, path: str) -> dict[str, float]:
    out = {}
    for key, value in figures.items():
        x = p.number(value, f"{path}.{key}", high=MAX_FACTOR, default=1.0)
        if x <= 0 and key not in _HOST:
            p.add(f"{path}.{key}", f"{value!r} must be > 0 (1: as the profile measured)")
        out[key] = x
    return out


def device_model_from_dict(data: object, source: str) -> DeviceModel:
    """Validate a decoded ``gpipe-device/1`` object; every problem in one error."""
    p = Problems()
    obj = p.mapping(data, "$", "a device model object")
    p.keys(obj, "$", _KEYS, required=("format", "name", *_FITTED))
    if obj.get("format", DEVICE_FORMAT) != DEVICE_FORMAT:
        p.add("$.format", f"{obj.get('format')!r} is not {DEVICE_FORMAT!r}")
    figures = _check_figures({k: obj.get(k, 1.0) for k in _FITTED}, p, "$")
    names = obj.get("device_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        p.add("$.device_names", "must be a list of device names (as profiles name them)")
        names = []
    peaks = p.mapping(obj.get("peak_tflops", {}), "$.peak_tflops", "an object dtype -> TFLOP/s")
    peak = tuple((str(k), p.number(v, f"$.peak_tflops.{k}", high=1e6)) for k, v in peaks.items())
    work = {k: p.number(obj.get(k, 1.0 if k in _UNIT else 0.0), f"$.{k}", high=1e6)
            for k in _WORK}
    for key in _UNIT:
        if not 0 < work[key] <= 1:
            p.add(f"$.{key}", f"{obj.get(key)!r} must be in (0, 1]: a share of the peak")
    source_kind = p.text(obj.get("source", "fitted"), "$.source", "fitted")
    if source_kind not in ("fitted", "published"):
        p.add("$.source", f"{source_kind!r} must be 'fitted' or 'published'")
    fit = p.mapping(obj.get("fit", {}), "$.fit", "an object")
    memory_bytes = p.whole(obj.get("memory_bytes", 0), "$.memory_bytes")
    if p:
        raise DeviceModelError(f"{source}: not a valid {DEVICE_FORMAT} device model:\n  "
                               + "\n  ".join(p))
    return DeviceModel(str(obj["name"]), **figures, device_names=tuple(names),
                       kind=str(obj.get("kind", "cuda")), memory_bytes=memory_bytes,
                       source=source_kind, peak_tflops=peak,
                       **work,
                       how=str(obj.get("how", "")), fit=tuple(fit.items()))


def device_model_to_dict(dm: DeviceModel, *, fit: bool = True) -> dict[str, Any]:
    """The JSON object of a device model (``device_model_from_dict`` reads it back); ``fit``:
    with the record of how well it fitted its measurements (a plan leaves it out)."""
    out: dict[str, Any] = {"format": DEVICE_FORMAT, "name": dm.name,
                           "device_names": list(dm.device_names), "kind": dm.kind,
                           "memory_bytes": dm.memory_bytes,
                           "source": dm.source, **{k: getattr(dm, k) for k in _FITTED}}
    if dm.peak_tflops:
        out["peak_tflops"] = dict(dm.peak_tflops)
    for key in _WORK:
        if getattr(dm, key) != (1.0 if key in _UNIT else 0.0):
            out[key] = getattr(dm, key)
    if dm.how:
        out["how"] = dm.how
    if fit and dm.fit:
        out["fit"] = dict(dm.fit)
    return out


def shipped_device_models() -> list[str]:
    """Names of the device models shipped in ``profiles/devices``, e.g. ``'h200'``."""
    folder = resources.files("profiles").joinpath(_FOLDER)
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".json"))


def load_device_model(path_or_name: str | Path) -> DeviceModel:
    """A device model from a ``gpipe-device/1`` file or a shipped name such as ``h200``."""
    if is_file(path_or_name):
        return device_model_from_dict(read_json(path_or_name, "device model",
                                                DeviceModelError), str(path_or_name))
    name = str(path_or_name).removesuffix(".json")
    if name in shipped_device_models():
        res = resources.files("profiles").joinpath(_FOLDER, f"{name}.json")
        data = decode_json(res.read_bytes, f"shipped device model {name}", DeviceModelError)
        return device_model_from_dict(data, f"shipped device model {name}")
    raise FileNotFoundError(
        f"device model {str(path_or_name)!r} is neither a file nor a shipped device model;"
        f" give a path to a {DEVICE_FORMAT} file (partition-model calibrate --steps writes one),"
        f" one of: {', '.join(shipped_device_models())}, or none")


def device_model_for(device_name: str, kind: str, how: str = "") -> DeviceModel | None:
    """The shipped device model of a profile's device (by its name), or None: on a CPU (the
    host is the device, so a layer costs in a step what it cost alone), and for a profile
    whose ``how`` says its layers were timed inside passes of the whole model (its times are
    already a step's).

        >>> device_model_for("NVIDIA H200", "cuda").name, device_model_for("cpu", "cpu")
        ('h200', None)
        >>> print(device_model_for("NVIDIA H200", "cuda", f"Each layer {IN_STEP_HOW} ..."))
        None
    """
    if kind not in ("cuda", "rocm") or IN_STEP_HOW in how:
        return None
    for name in shipped_device_models():
        dm = load_device_model(name)
        if device_name in dm.device_names:
            return dm
    return None


def save_device_model(dm: DeviceModel, path: str | Path) -> None:
    """Write a device model as indented JSON (``load_device_model`` reads it)."""
    Path(path).write_text(json.dumps(device_model_to_dict(dm), indent=1) + "\n")
