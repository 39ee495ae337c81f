"""Timelines: what each stage did when, predicted (simulator) or measured (executor).

    >>> tl = Timeline(2, (Event(Action("F", 0, 0), 0.0, 1.0), Event(Action("F", 1, 0), 1.0, 2.0),
    ...                   Event(Action("B", 1, 0), 2.0, 4.0), Event(Action("B", 0, 0), 4.0, 6.0)))
    >>> tl.step_ms, tl.stage_busy_ms(), round(tl.bubble_fraction, 3)
    (6.0, [3.0, 3.0], 0.5)

Both kinds export to the same Chrome trace-event JSON (one track per stage; open it in
https://ui.perfetto.dev or chrome://tracing), so a prediction and a measurement of the same
plan can be laid side by side, and read back for comparison.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .jsonfile import read_json
from .schedule import COMPUTE, Action

__all__ = ["Event", "Timeline", "load_chrome_trace", "merge_events", "save_chrome_trace"]


@dataclass(frozen=True)
class Event:
    """One action's interval; ``memory_bytes``: its stage's memory just after it, if known."""

    action: Action
    start_ms: float
    end_ms: float
    memory_bytes: float | None = None

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms


@dataclass(frozen=True)
class Timeline:
    """Events of one training step over K stages; ``kind`` is 'predicted' or 'measured'."""

    stages: int
    events: tuple[Event, ...]
    kind: str = "predicted"
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def start_ms(self) -> float:
        return min((e.start_ms for e in self.events), default=0.0)

    @property
    def step_ms(self) -> float:
        """First start to last end."""
        return max((e.end_ms for e in self.events), default=0.0) - self.start_ms

    def stage_events(self, stage: int) -> list[Event]:
        return sorted((e for e in self.events if e.action.stage == stage),
                      key=lambda e: e.start_ms)

    def stage_busy_ms(self) -> list[float]:
        """Per stage, the time spent in compute actions (F and B; recompute included in B)."""
        busy = [0.0] * self.stages
        for e in self.events:
            if e.action.kind in COMPUTE:
                busy[e.action.stage] += e.duration_ms
        return busy

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the K x step area: 1 - sum(busy) / (K x step)."""
        step = self.step_ms
        return 1.0 - sum(self.stage_busy_ms()) / (self.stages * step) if step > 0 else 0.0

    def stage_peak_bytes(self) -> list[float]:
        """Per stage, the largest recorded memory (0 where none was recorded)."""
        peak = [0.0] * self.stages
        for e in self.events:
            if e.memory_bytes is not None:
                peak[e.action.stage] = max(peak[e.action.stage], e.memory_bytes)
        return peak

    def to_chrome_trace(self) -> dict[str, Any]:
        """Chrome trace-event JSON: one complete ('X') event per action, one track per stage,
        times in microseconds from the step's start."""
        t0 = self.start_ms
        trace: list[dict[str, Any]] = [
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": k,
             "args": {"name": f"stage {k}"}} for k in range(self.stages)]
        trace.append({"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
                      "args": {"name": f"{self.kind} step"}})
        for e in sorted(self.events, key=lambda e: (e.start_ms, e.action.stage)):
            args: dict[str, Any] = {"action": str(e.action), "microbatch": e.action.microbatch}
            if e.memory_bytes is not None:
                args["memory_bytes"] = e.memory_bytes
            trace.append({"name": f"{e.action.kind}{e.action.microbatch}", "cat": e.action.kind,
                          "ph": "X", "pid": 0, "tid": e.action.stage,
                          "ts": round((e.start_ms - t0) * 1e3, 3),
                          "dur": round(e.duration_ms * 1e3, 3), "args": args})
        return {"traceEvents": trace, "displayTimeUnit": "ms",
                "otherData": {"kind": self.kind, "stages": self.stages, **self.meta}}

    @staticmethod
    def from_chrome_trace(data: Mapping[str, Any]) -> Timeline:
        """Inverse of ``to_chrome_trace`` (times come back relative to the step's start)."""
        events = []
        for ev in data.get("traceEvents", []):
            if ev.get("ph") != "X" or "action" not in ev.get("args", {}):
                continue
            action = Action.parse(ev["args"]["action"])
            start = float(ev["ts"]) / 1e3
            events.append(Event(action, start, start + float(ev["dur"]) / 1e3,
                                ev["args"].get("memory_bytes")))
        other = dict(data.get("otherData", {}))
        stages = int(other.pop("stages", 1 + max((e.action.stage for e in events), default=0)))
        kind = str(other.pop("kind", "measured"))
        return Timeline(stages, tuple(events), kind, other)


def save_chrome_trace(timeline: Timeline, path: str | Path) -> None:
    """Write the trace; it opens in Perfetto (https://ui.perfetto.dev) or chrome://tracing."""
    Path(path).write_text(json.dumps(timeline.to_chrome_trace()) + "\n")


def load_chrome_trace(path: str | Path) -> Timeline:
    """Read a trace written by ``save_chrome_trace`` back into a Timeline."""
    data = read_json(path, "trace")
    if not isinstance(data, dict) or "traceEvents" not in data:
        raise ValueError(f"trace file {str(path)!r} has no 'traceEvents'; give a trace written "
                         f"by partition-model (simulate --trace) or the executor")
    return Timeline.from_chrome_trace(data)


def merge_events(rows: Sequence[Sequence[Event]]) -> tuple[Event, ...]:
    """Concatenate per-stage event lists (e.g. one per rank) into one tuple."""
    return tuple(e for row in rows for e in row)
