"""PNG Gantt charts of timelines, laid out like Figure 2 of the GPipe paper (needs matplotlib).

    >>> import tempfile, pathlib
    >>> from partitioner.schedule.ir import Action
    >>> from partitioner.formats.timeline import Event, Timeline
    >>> tl = Timeline(1, (Event(Action("F", 0, 0), 0.0, 1.0), Event(Action("B", 0, 0), 1.0, 3.0)))
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "step.png"
    >>> save_gantt_png([tl], path, ["predicted"])
    >>> path.read_bytes()[:4] == b"\\x89PNG"
    True

One row per rank (stage k on rank k unless the timeline places several stages on a rank;
the first on top), forwards, backwards and a split backward's input and weight gradients (I,
W) in their own colours with the micro-batch number on each box wide enough to hold it, a
rank's later stages in lighter shades of the same colours, sends as thin grey bars, idle
time (the bubble) left empty; the time axis is in ms from the step's start. Several
timelines (e.g. predicted above measured) share one time axis so that they compare by eye.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from partitioner.formats.timeline import Timeline

__all__ = ["PlotUnavailableError", "save_gantt_png"]

_COLOURS = {"F": "#4e8fd6", "B": "#f0923a", "I": "#d9534f", "W": "#3aa655", "send": "#9a9a9a"}
_LABELS = {"F": "forward F(k, i)", "B": "backward B(k, i) (with recompute)",
           "I": "input gradient I(k, i) (with recompute)", "W": "weight gradient W(k, i)",
           "send": "send (activation / gradient)"}
_COMPUTE = ("F", "B", "I", "W")
_TEXT = {"F": "white", "B": "black", "I": "white", "W": "white"}
_WIDTH_IN = 13.0
_LEFT, _RIGHT = 0.07, 0.985  # axes extent as figure fractions


class PlotUnavailableError(ImportError):
    """matplotlib is not installed; the message says how to install it."""


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailableError(
            "the PNG Gantt chart needs matplotlib, which is not installed; install it with "
            "`pip install 'gpipe-planner[plot]'` (or `pip install matplotlib`), or write a "
            "Chrome trace instead (--trace) and open it in https://ui.perfetto.dev") from None
    return Figure


def save_gantt_png(timelines: Sequence[Timeline], path: str | Path,
                   titles: Sequence[str] | None = None, dpi: int = 130) -> None:
    """Draw the timelines one above the other (sharing the time axis) into a PNG file."""
    if not timelines:
        raise ValueError("save_gantt_png needs at least one timeline")
    if titles is not None and len(titles) != len(timelines):
        raise ValueError(f"{len(titles)} titles given for {len(timelines)} timelines; give one "
                         f"title per timeline, or none")
    figure_class = _figure_class()
    row_in = [_row_height_in(tl.ranks) for tl in timelines]
    panel_in = [r * tl.ranks + 0.75 for r, tl in zip(row_in, timelines, strict=True)]
    height_in = sum(panel_in) + 0.9
    fig = figure_class(figsize=(_WIDTH_IN, height_in), dpi=dpi)
    span_ms = max(max(tl.step_ms for tl in timelines), 1e-9)
    top = 1.0 - 0.55 / height_in
    axes: list[Any] = []
    for j, tl in enumerate(timelines):
        bottom = top - (panel_in[j] - 0.45) / height_in
        ax = fig.add_axes((_LEFT, bottom, _RIGHT - _LEFT, top - bottom),
                          sharex=axes[0] if axes else None)
        title = titles[j] if titles else tl.kind
        ranks = f", R={tl.ranks}" if tl.placement else ""
        _draw(ax, tl, span_ms, row_in[j] * 72.0, f"{title}: step {tl.step_ms:.2f} ms, "
              f"bubble {100 * tl.bubble_fraction:.1f}%, K={tl.stages}{ranks}")
        axes.append(ax)
        top = bottom - 0.45 / height_in
    axes[-1].set_xlabel("time since the step started (ms)")
    axes[0].set_xlim(0.0, span_ms * 1.01)
    shown = {e.action.kind for tl in timelines for e in tl.events}
    kinds = [k for k in _COMPUTE if k in shown] + ["send"]
    handles = [_patch(_COLOURS[k], _LABELS[k]) for k in kinds]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), frameon=False,
               fontsize=9, bbox_to_anchor=(_RIGHT, 1.0))
    fig.savefig(str(path), dpi=dpi)


def _row_height_in(rows: int) -> float:
    """Rows shrink as their number grows so that a 64-row chart stays a page tall."""
    return max(0.09, min(0.42, 6.0 / max(rows, 1)))


def _patch(colour: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=colour, edgecolor="white", label=label)


def _draw(ax: Any, tl: Timeline, span_ms: float, row_pt: float, title: str) -> None:
    """One panel: boxes per rank row (each stage of a rank its own shade), numbers where they
    fit."""
    t0, rank_of = tl.start_ms, tl.rank_of
    px_per_ms = _WIDTH_IN * (_RIGHT - _LEFT) * 72.0 / span_ms  # in points
    font_pt = max(4.0, min(8.5, 0.55 * row_pt))
    edge = "white" if row_pt >= 7 else "none"
    for r in range(tl.ranks):
        stages = [k for k in range(tl.stages) if rank_of[k] == r]
        sends: list[tuple[float, float]] = []
        for nth, k in enumerate(stages):
            bars: dict[str, list[tuple[float, float]]] = {kind: [] for kind in _COMPUTE}
            labels: dict[str, list[tuple[float, str]]] = {kind: [] for kind in _COMPUTE}
            for e in tl.stage_events(k):
                act: str = e.action.kind
                if act in ("SF", "SB"):
                    sends.append((e.start_ms - t0, e.duration_ms))
                elif act in bars:  # receives: their waiting is the gap before the next action
                    bars[act].append((e.start_ms - t0, e.duration_ms))
                    labels[act].append((e.start_ms - t0 + e.duration_ms / 2,
                                        str(e.action.microbatch)))
            for kind, items in labels.items():  # all boxes of a row and kind numbered, or none
                chars = max((len(text) for _, text in items), default=0)
                narrowest_pt = min((d for _, d in bars[kind]), default=0.0) * px_per_ms
                if row_pt >= 7 and narrowest_pt >= 0.62 * font_pt * chars + 2:
                    for x, text in items:
                        ax.text(x, r, text, ha="center", va="center", fontsize=font_pt,
                                color=_TEXT[kind] if nth == 0 else "black")
            shade = 1.0 if nth == 0 else 0.55  # a rank's later stages: lighter
            for kind in _COMPUTE:
                if bars[kind]:
                    ax.broken_barh(bars[kind], (r - 0.4, 0.8), facecolors=_COLOURS[kind],
                                   alpha=shade, edgecolor=edge, linewidth=0.5)
        ax.broken_barh(sends, (r - 0.12, 0.24), facecolors=_COLOURS["send"])
    ax.set_ylim(tl.ranks - 0.5, -0.5)  # the first row on top, as in the paper
    every = max(1, tl.ranks // 16)
    ticks = list(range(0, tl.ranks, every))
    word = "rank" if tl.placement else "stage"
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{word} {r}" for r in ticks], fontsize=8)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_title(title, loc="left", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
