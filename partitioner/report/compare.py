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
        p, m = self.predicted.meta, self.measured.meta
        out = []
        pa, ma = p.get("stage_activation_peak_bytes"), m.get("stage_activation_peak_bytes")
        if isinstance(pa, list) and isinstance(ma, list) and len(pa) == len(ma):
            out += [(f"stage {k} activations peak", float(x), float(y))
                    for k, (x, y) in enumerate(zip(pa, ma, strict=True))]
        pr = p.get("rank_peak_bytes", p.get("stage_peak_bytes"))
        mr = m.get("rank_allocated_peak_bytes")
        if isinstance(pr, list) and isinstance(mr, list) and len(pr) == len(mr):
            out += [(f"rank {r} allocated peak", float(x), float(y))
                    for r, (x, y) in enumerate(zip(pr, mr, strict=True))]
        return out

    @property
    def memory_errors(self) -> list[float]:
        """Relative error of each stage's predicted peak activations (empty: not in both)."""
        return [relative_error(pv, mv) for name, pv, mv in self.memory()
                if name.endswith("activations peak")]


def compare_timelines(predicted: Timeline, measured: Timeline) -> Comparison:
    """Pair two timelines of the same plan; they must have the same number of stages."""
    if predicted.stages != measured.stages:
        raise ValueError(
            f"the predicted timeline has K={predicted.stages} stages but the measured one has "
            f"K={measured.stages}; compare a plan's prediction with a run of the same plan")
    return Comparison(predicted, measured)
