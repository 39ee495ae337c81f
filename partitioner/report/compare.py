"""Prediction against reality: step time, bubble, per-stage busy time and memory of two timelines.

    >>> from partitioner.schedule.ir import Action
    >>> from partitioner.formats.timeline import Event, Timeline
    >>> pred = Timeline(1, (Event(Action("F", 0, 0), 0.0, 1.0), Event(Action("B", 0, 0), 1.0, 3.0)))
    >>> meas = Timeline(1, (Event(Action("F", 0, 0), 0.0, 1.5), Event(Action("B", 0, 0), 1.5, 4.0)))
    >>> round(compare_timelines(pred, meas).step_error, 3)
    -0.25

Memory, where both timelines carry it (``partition-model simulate --trace`` and ``partition-model
run --trace`` write it): each stage's peak activation bytes, the simulator's replayed peak less
the training state against what the executor's stages held for backward
(``executor.runtime.memory``); and on CUDA each rank's ``max_memory_allocated`` against the
predicted peak of its stages, training state included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from partitioner.formats.timeline import Timeline
from partitioner.formats.units import format_bytes
from partitioner.report.tables import format_table

__all__ = ["Comparison", "compare_timelines", "relative_error"]


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured; 0 when both are 0, inf when only measured is."""
    if measured == 0:
        return 0.0 if predicted == 0 else float("inf")
    return (predicted - measured) / measured


@dataclass(frozen=True)
class Comparison:
    """Figures of a predicted and a measured timeline of the same plan."""

    predicted: Timeline
    measured: Timeline

    @property
    def step_error(self) -> float:
        """Relative error of the predicted step time (negative: the prediction is too fast)."""
        return relative_error(self.predicted.step_ms, self.measured.step_ms)

    def report(self) -> str:
        """A table: step, bubble and each stage's busy time, predicted vs measured, error in %."""
        p, m = self.predicted, self.measured

        def row(name: str, pv: float, mv: float, unit: str = "ms") -> list[str]:
            if unit == "%":
                return [name, f"{100 * pv:.1f}%", f"{100 * mv:.1f}%",
                        f"{100 * (pv - mv):+.1f} pts"]
            return [name, f"{pv:.3f}", f"{mv:.3f}", f"{100 * relative_error(pv, mv):+.1f}%"]

        rows = [row("step_ms", p.step_ms, m.step_ms), row("bubble", p.bubble_fraction,
                                                          m.bubble_fraction, "%")]
        rows += [row(f"stage {k} busy_ms", pb, mb) for k, (pb, mb) in
                 enumerate(zip(p.stage_busy_ms(), m.stage_busy_ms(), strict=True))]
        for name, pv, mv in self.memory():
            rows.append([name, format_bytes(pv), format_bytes(mv),
                         f"{100 * relative_error(pv, mv):+.1f}%"])
        return format_table(["", "predicted", "measured", "error"], rows)

    def memory(self) -> list[tuple[str, float, float]]:
        """(row name, predicted, measured) of every memory figure both timelines have: each
        stage's peak activations, and on CUDA each rank's allocated peak."""
        out = []
        pairs = (("stage {} activations peak", "stage_activation_peak_bytes", None,
                  "stage_activation_peak_bytes"),
                 ("rank {} allocated peak", "rank_peak_bytes", "stage_peak_bytes",
                  "rank_allocated_peak_bytes"))
        for name, key, fallback, measured_key in pairs:
            mv = _bytes(self.measured, measured_key)
            if mv is None:  # not measured: nothing to compare, whatever was predicted
                continue
            pv = _bytes(self.predicted, key if key in self.predicted.meta else fallback)
            if pv is not None and len(pv) == len(mv):
                out += [(name.format(k), x, y) for k, (x, y) in enumerate(zip(pv, mv,
                                                                             strict=True))]
        return out

    @property
    def memory_errors(self) -> list[float]:
        """Relative error of each stage's predicted peak activations (empty: not in both)."""
        return [relative_error(pv, mv) for name, pv, mv in self.memory()
                if name.endswith("activations peak")]


def _bytes(timeline: Timeline, key: str | None) -> list[float] | None:
    """``timeline.meta[key]`` as byte counts (None when absent); a list with anything but
    finite numbers >= 0 is an error that names the entry."""
    values = timeline.meta.get(key) if key is not None else None
    if values is None:
        return None
    if not isinstance(values, list):
        raise ValueError(f"the {timeline.kind} trace's {key} is {values!r}, not a list of byte "
                         f"counts (one per stage or rank); fix or drop it")
    for i, x in enumerate(values):
        if isinstance(x, bool) or not isinstance(x, int | float) or not 0 <= x < math.inf:
            raise ValueError(f"the {timeline.kind} trace's {key}[{i}] is {x!r}; a byte count "
                             f"must be a finite number >= 0: fix the entry or drop {key}")
    return [float(x) for x in values]


def compare_timelines(predicted: Timeline, measured: Timeline) -> Comparison:
    """Pair two timelines of the same plan; they must have the same number of stages."""
    if predicted.stages != measured.stages:
        raise ValueError(
            f"the predicted timeline has K={predicted.stages} stages but the measured one has "
            f"K={measured.stages}; compare a plan's prediction with a run of the same plan")
    return Comparison(predicted, measured)
