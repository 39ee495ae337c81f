"""Measured whole training steps (``gpipe-steps/0``): ground truth for fitting a device model.

    >>> steps = load_steps(REFERENCE_STEPS)
    >>> steps.model, steps.global_batch, len(steps.steps), steps.steps[0]
    ('gpt-1.3b', 16, 10, MeasuredStep(microbatches=1, segments=4, recompute=False, step_ms=243.52374267578125))

Each step ran the profile's model cut into ``segments`` contiguous segments of equal layer
counts (cut after layer round(L k / segments)), all on one device, in GPipe order (the M
forwards, then the M backwards in reverse), B = ``global_batch`` samples in M micro-batches,
with or without recompute, and was timed whole (``step_ms``; no optimizer step). The format is
the one ``tools/gpu_check.py`` writes and ``shared/reference/h200/steps/`` uses; other fields
(peaks, the fastest repetition) are kept in the file and ignored here.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from partitioner.formats.checks import Problems
from partitioner.formats.jsonfile import decode_json, is_file, read_json

__all__ = ["REFERENCE_STEPS", "STEPS_FORMAT", "MeasuredStep", "Steps", "StepsError", "load_steps",
           "steps_from_dict"]

STEPS_FORMAT = "gpipe-steps/0"
#: The shipped measurements the H200 device model was fitted to (``profiles/h200/steps``).
REFERENCE_STEPS = "h200/steps/gpt-1.3b"
_KEYS = ("format", "model", "profile", "device", "torch", "dtype", "input", "global_batch",
         "how", "adamw_step_ms", "steps", "extra")
_STEP_KEYS = ("microbatches", "segments", "recompute", "step_ms", "step_ms_min",
              "peak_bytes_above_params", "extra")


class StepsError(ValueError):
    """A steps file that breaks the format."""


@dataclass(frozen=True)
class MeasuredStep:
    microbatches: int
    segments: int
    recompute: bool
    step_ms: float


@dataclass(frozen=True)
class Steps:
    model: str
    profile: str  # the profile the steps' model was profiled as (a shipped name or a note)
    device: str
    global_batch: int
    steps: tuple[MeasuredStep, ...]


def steps_from_dict(data: object, source: str) -> Steps:
    """Validate a decoded ``gpipe-steps/0`` object; every problem in one error."""
    p = Problems()
    obj = p.mapping(data, "$", "a steps object")
    p.keys(obj, "$", _KEYS, required=("format", "model", "global_batch", "steps"))
    if obj.get("format", STEPS_FORMAT) != STEPS_FORMAT:
        p.add("$.format", f"{obj.get('format')!r} is not {STEPS_FORMAT!r}")
    big_b = p.whole(obj.get("global_batch", 1), "$.global_batch", low=1, high=2**40)
    rows = obj.get("steps", [])
    if not isinstance(rows, list) or not rows:
        p.add("$.steps", "must be a non-empty list of measured steps")
        rows = []
    out = []
    for j, row in enumerate(rows):
        path = f"$.steps[{j}]"
        r = p.mapping(row, path, "a measured step")
        p.keys(r, path, _STEP_KEYS, required=("microbatches", "segments", "recompute",
                                              "step_ms"))
        m = p.whole(r.get("microbatches", 1), f"{path}.microbatches", low=1, high=big_b)
        k = p.whole(r.get("segments", 1), f"{path}.segments", low=1, high=2**20)
        rc = r.get("recompute", False)
        if not isinstance(rc, bool):
            p.add(f"{path}.recompute", f"{rc!r} must be true or false")
            rc = False
        ms = p.number(r.get("step_ms", 0.0), f"{path}.step_ms", high=1e9)
        if ms <= 0 and "step_ms" in r:
            p.add(f"{path}.step_ms", f"{r['step_ms']!r} must be a time > 0 in ms")
        out.append(MeasuredStep(m, k, rc, ms))
    if p:
        raise StepsError(f"{source}: not a valid {STEPS_FORMAT} file:\n  " + "\n  ".join(p))
    return Steps(str(obj["model"]), str(obj.get("profile", "")), str(obj.get("device", "")),
                 big_b, tuple(out))


def load_steps(path_or_name: str | Path) -> Steps:
    """Measured steps from a file, or the shipped ``h200/steps/gpt-1.3b``."""
    if is_file(path_or_name):
        return steps_from_dict(read_json(path_or_name, "steps", StepsError), str(path_or_name))
    name = str(path_or_name).removesuffix(".json")
    res = resources.files("profiles").joinpath(*f"{name}.json".split("/"))
    if "/steps/" in f"/{name}" and res.is_file():
        return steps_from_dict(decode_json(res.read_bytes, f"shipped steps {name}", StepsError),
                               f"shipped steps {name}")
    raise FileNotFoundError(f"steps {str(path_or_name)!r} is neither a file nor shipped "
                            f"measured steps; give a {STEPS_FORMAT} file (tools/gpu_check.py "
                            f"writes one) or {REFERENCE_STEPS}")
