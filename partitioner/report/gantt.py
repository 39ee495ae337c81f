"""PNG Gantt charts of timelines, laid out like Figure 2 of the GPipe paper (needs matplotlib).

    >>> import tempfile, pathlib
    >>> from partitioner.schedule.ir import Action
    >>> from partitioner.formats.timeline import Event, Timeline
    >>> tl = Timeline(1, (Event(Action("F", 0, 0), 0.0, 1.0), Event(Action("B", 0, 0), 1.0, 3.0)))
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "step.png"
    >>> save_gantt_png([tl], path, ["predicted"])
    >>> path.read_bytes()[:4] == b"\\x89PNG"
    True

One row per stage (stage 0 on top), forwards and backwards in two colours with the
micro-batch number on each box wide enough to hold it, sends as thin grey bars, idle time
(the bubble) left empty; the time axis is in ms from the step's start. Several timelines
(e.g. predicted above measured) share one time axis so that they compare by eye.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from partitioner.formats.timeline import Timeline

__all__ = ["PlotUnavailableError", "save_gantt_png"]

_COLOURS = {"F": "#4e8fd6", "B": "#f0923a", "send": "#9a9a9a"}
_LABELS = {"F": "forward F(k, i)", "B": "backward B(k, i) (with recompute)",
           "send": "send (activation / gradient)"}
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
    row_in = [_row_height_in(tl.stages) for tl in timelines]
    panel_in = [r * tl.stages + 0.75 for r, tl in zip(row_in, timelines, strict=True)]
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
        _draw(ax, tl, span_ms, row_in[j] * 72.0, f"{title}: step {tl.step_ms:.2f} ms, "
              f"bubble {100 * tl.bubble_fraction:.1f}%, K={tl.stages}")
        axes.append(ax)
        top = bottom - 0.45 / height_in
    axes[-1].set_xlabel("time since the step started (ms)")
    axes[0].set_xlim(0.0, span_ms * 1.01)
    handles = [_patch(_COLOURS[k], _LABELS[k]) for k in ("F", "B", "send")]
    fig.legend(handles=handles, loc="upper right", ncol=3, frameon=False, fontsize=9,
               bbox_to_anchor=(_RIGHT, 1.0))
    fig.savefig(str(path), dpi=dpi)


def _row_height_in(stages: int) -> float:
    """Rows shrink as K grows so that a 64-stage chart stays a page tall."""
    return max(0.09, min(0.42, 6.0 / max(stages, 1)))


def _patch(colour: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=colour, edgecolor="white", label=label)


def _draw(ax: Any, tl: Timeline, span_ms: float, row_pt: float, title: str) -> None:
    """One panel: boxes per stage row, numbers where they fit."""
    t0 = tl.start_ms
    px_per_ms = _WIDTH_IN * (_RIGHT - _LEFT) * 72.0 / span_ms  # in points
    font_pt = max(4.0, min(8.5, 0.55 * row_pt))
    for k in range(tl.stages):
        bars: dict[str, list[tuple[float, float]]] = {"F": [], "B": [], "send": []}
        labels: dict[str, list[tuple[float, str]]] = {"F": [], "B": []}
        for e in tl.stage_events(k):
            kind: str = e.action.kind if e.action.kind in ("F", "B") else "send"
            if kind == "send" and e.action.kind not in ("SF", "SB"):
                continue  # receives: their waiting is the gap before the next action
            bars[kind].append((e.start_ms - t0, e.duration_ms))
            if kind != "send":
                labels[kind].append((e.start_ms - t0 + e.duration_ms / 2,
                                     str(e.action.microbatch)))
        for compute, items in labels.items():  # all boxes of a row and kind numbered, or none
            chars = max((len(text) for _, text in items), default=0)
            narrowest_pt = min((d for _, d in bars[compute]), default=0.0) * px_per_ms
            if row_pt >= 7 and narrowest_pt >= 0.62 * font_pt * chars + 2:
                for x, text in items:
                    ax.text(x, k, text, ha="center", va="center", fontsize=font_pt,
                            color="white" if compute == "F" else "black")
        edge = "white" if row_pt >= 7 else "none"
        ax.broken_barh(bars["F"], (k - 0.4, 0.8), facecolors=_COLOURS["F"], edgecolor=edge,
                       linewidth=0.5)
        ax.broken_barh(bars["B"], (k - 0.4, 0.8), facecolors=_COLOURS["B"], edgecolor=edge,
                       linewidth=0.5)
        ax.broken_barh(bars["send"], (k - 0.12, 0.24), facecolors=_COLOURS["send"])
    ax.set_ylim(tl.stages - 0.5, -0.5)  # stage 0 on top, as in the paper
    every = max(1, tl.stages // 16)
    ticks = list(range(0, tl.stages, every))
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"stage {k}" for k in ticks], fontsize=8)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_title(title, loc="left", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
