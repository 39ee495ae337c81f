"""Fitting a device model to measured whole steps, and predicting those steps.

    >>> from partitioner import load_profile
    >>> from partitioner.formats.device import load_device_model
    >>> from partitioner.formats.steps import load_steps
    >>> rows = predict_steps(load_profile("h200/gpt-1.3b"), load_steps("h200/steps/gpt-1.3b"),
    ...                      load_device_model("h200"))
    >>> len(rows), max(abs(r.error) for r in rows) < 0.15
    (10, True)

A measured step (``formats.steps``) is replayed as it ran: the profile's layers cut into the
step's equal segments, every segment on one device (so they run one at a time and exchange
tensors for free), GPipe, B samples in M micro-batches, recompute on or off, no optimizer step.
``fit_device_model`` chooses the five figures of a ``DeviceModel`` that make these replays
closest to the measured steps: it minimises the 8-norm of the relative errors' logarithms (near
the largest error, but smooth enough to descend) by the Nelder-Mead simplex method, restarted
once from its best point, from the given figures and from ``STARTS`` (the best of the four
kept), every figure within ``BOUNDS``. Deterministic, numpy only, 15-20 s for ten steps here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np

from partitioner.cost.fit import minimise_within
from partitioner.cost.model import CostModel
from partitioner.cost.sizes import FloatArray
from partitioner.formats.assumptions import LINKS, Runtime
from partitioner.formats.device import DeviceModel
from partitioner.formats.profile import Profile
from partitioner.formats.steps import MeasuredStep, Steps
from partitioner.simulator.engine import simulate

__all__ = ["BOUNDS", "StepFit", "fit_device_model", "predict_steps"]

#: The range each figure is searched in.
BOUNDS = {"host_forward": (0.05, 3.0), "host_backward": (0.05, 3.0),
          "host_recompute": (0.05, 6.0), "device_scale": (0.5, 2.0),
          "small_work_exponent": (0.3, 1.0)}
_NORM = 8
#: Further starting points (figures in ``BOUNDS``' order): the objective has kinks (a layer
#: turns from host- to device-bound), so one descent can stop short of the best figures.
STARTS = ((0.5, 0.5, 1.5, 1.0, 0.9), (0.8, 0.8, 1.2, 1.0, 0.7),
          (0.2, 1.2, 1.6, 1.0, 0.8))  # a forward issued behind the device's work


@dataclass(frozen=True)
class StepFit:
    """One measured step against its replay."""

    step: MeasuredStep
    predicted_ms: float

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_ms - self.step.step_ms) / self.step.step_ms


def _predict(profile: Profile, big_b: int, step: MeasuredStep, runtime: Runtime) -> float:
    n, k = profile.num_layers, step.segments
    if not 1 <= k <= n or big_b < step.microbatches:
        raise ValueError(f"a step of {k} segments and M={step.microbatches} does not fit the "
                         f"profile's {n} layers and B={big_b}; give steps of this profile's model")
    cuts = [round(n * j / k) for j in range(k + 1)]
    cm = CostModel(profile, big_b, step.microbatches, stages=k,
                   recompute="always" if step.recompute else "never", schedule="gpipe",
                   link=LINKS["free"], optimizer="none", runtime=runtime)
    return simulate(cm, list(itertools.pairwise(cuts)), devices=[0] * k,
                    record=False).step_ms


def predict_steps(profile: Profile, steps: Steps, device: DeviceModel | None,
                  runtime: Runtime | None = None) -> list[StepFit]:
    """Every measured step replayed under ``device`` (None: the profile as it is) and the
    rest of ``runtime`` (default: none)."""
    base = runtime or Runtime()
    rt = Runtime(base.compute_scale, base.action_ms, base.message_ms, device)
    return [StepFit(s, _predict(profile, steps.global_batch, s, rt)) for s in steps.steps]


def fit_device_model(profile: Profile, steps: Steps, start: DeviceModel | None = None,
                     name: str = "fitted", evals: int = 400) -> DeviceModel:
    """The device model whose replays of ``steps`` come closest to them (see the module
    docstring), starting from ``start`` (default: every figure 1, the profile as it is)."""
    dm = start or DeviceModel(name)
    keys = list(BOUNDS)
    lo = np.array([BOUNDS[k][0] for k in keys])
    hi = np.array([BOUNDS[k][1] for k in keys])

    def model_at(x: FloatArray) -> DeviceModel:
        return dm.with_figures(**dict(zip(keys, x.tolist(), strict=True)))

    def f(x: FloatArray) -> float:
        logs = [math.log(s.predicted_ms / s.step.step_ms) if s.predicted_ms > 0 else 10.0
                for s in predict_steps(profile, steps, model_at(x))]
        return float((sum(abs(v) ** _NORM for v in logs) / len(logs)) ** (1 / _NORM))

    best = minimise_within(f, lo, hi, ([getattr(dm, k) for k in keys], *STARTS), evals)
    return replace(model_at(best), name=name, source="fitted", fit=())

