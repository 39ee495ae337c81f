"""Timelines: what each stage did when, predicted (simulator) or measured (executor).

    >>> tl = Timeline(2, (Event(Action("F", 0, 0), 0.0, 1.0), Event(Action("F", 1, 0), 1.0, 2.0),
    ...                   Event(Action("B", 1, 0), 2.0, 4.0), Event(Action("B", 0, 0), 4.0, 6.0)))
    >>> tl.step_ms, tl.stage_busy_ms(), round(tl.bubble_fraction, 3)
    (6.0, [3.0, 3.0], 0.5)

Both kinds export to the same Chrome trace-event JSON (open it in https://ui.perfetto.dev or
chrome://tracing), so a prediction and a measurement of the same plan can be laid side by
side, and read back for comparison. Events belong to stages; the trace has one track per
*rank* (``placement[k]`` = the rank of stage k; empty: stage k on rank k, and the tracks are
named by stage as before), since a rank is one device and what it does when is what a reader
looks for; with several stages on a rank each event's name says its stage (``F3 (stage 5)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partitioner.formats.checks import Problems, show
from partitioner.formats.jsonfile import read_json
from partitioner.formats.units import MAX_MS
from partitioner.schedule.ir import COMPUTE, Action

__all__ = ["Event", "Timeline", "TraceError", "load_chrome_trace", "save_chrome_trace"]


class TraceError(ValueError):
    """A trace file that cannot be read back; the message lists every problem."""


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
    """Events of one training step over K stages; ``kind`` is 'predicted' or 'measured';
    ``placement[k]`` the rank of stage k (empty: stage k on rank k)."""

    stages: int
    events: tuple[Event, ...]
    kind: str = "predicted"
    meta: Mapping[str, Any] = field(default_factory=dict)
    placement: tuple[int, ...] = ()

    @property
    def rank_of(self) -> tuple[int, ...]:
        """The rank of each stage."""
        return self.placement or tuple(range(self.stages))

    @property
    def ranks(self) -> int:
        """R: the ranks (devices of one pipeline) the stages run on."""
        return max(self.rank_of) + 1 if self.stages else 0

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
        """Per stage, the time spent in compute actions (F and B, or F, I and W; recompute
        included in B or I)."""
        busy = [0.0] * self.stages
        for e in self.events:
            if e.action.kind in COMPUTE:
                busy[e.action.stage] += e.duration_ms
        return busy

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the R x step area (R ranks; R = K with a stage per rank): 1 -
        sum(busy) / (R x step)."""
        step = self.step_ms
        return 1.0 - sum(self.stage_busy_ms()) / (self.ranks * step) if step > 0 else 0.0

    def stage_peak_bytes(self) -> list[float]:
        """Per stage, the largest recorded memory (0 where none was recorded)."""
        peak = [0.0] * self.stages
        for e in self.events:
            if e.memory_bytes is not None:
                peak[e.action.stage] = max(peak[e.action.stage], e.memory_bytes)
        return peak

    def track_names(self) -> list[str]:
        """The name of each rank's track: ``stage k`` with a stage per rank, else ``rank r
        (stages a, b)``."""
        if not self.placement:
            return [f"stage {k}" for k in range(self.stages)]
        held = [[str(k) for k in range(self.stages) if self.placement[k] == r]
                for r in range(self.ranks)]
        return [f"rank {r} (stages {', '.join(ks)})" for r, ks in enumerate(held)]

    def to_chrome_trace(self) -> dict[str, Any]:
        """Chrome trace-event JSON: one complete ('X') event per action, one track per rank,
        times in microseconds from the step's start."""
        t0, rank_of, several = self.start_ms, self.rank_of, bool(self.placement)
        trace: list[dict[str, Any]] = [
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": name}}
            for r, name in enumerate(self.track_names())]
        trace.append({"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
                      "args": {"name": f"{self.kind} step"}})
        for e in sorted(self.events, key=lambda e: (e.start_ms, e.action.stage)):
            a = e.action
            args: dict[str, Any] = {"action": str(a), "microbatch": a.microbatch}
            if e.memory_bytes is not None:
                args["memory_bytes"] = e.memory_bytes  # the stage's
            name = f"{a.kind}{a.microbatch}" + (f" (stage {a.stage})" if several else "")
            trace.append({"name": name, "cat": a.kind, "ph": "X", "pid": 0,
                          "tid": rank_of[a.stage], "ts": round((e.start_ms - t0) * 1e3, 3),
                          "dur": round(e.duration_ms * 1e3, 3), "args": args})
        other: dict[str, Any] = {"kind": self.kind, "stages": self.stages, **self.meta}
        if self.placement:
            other["placement"] = list(self.placement)
        return {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": other}

    @staticmethod
    def from_chrome_trace(data: Mapping[str, Any], source: str = "trace") -> Timeline:
        """Inverse of ``to_chrome_trace`` (times come back relative to the step's start); a
        TraceError lists every problem with its JSON path."""
        p = Problems()
        raw = data.get("traceEvents")
        if not isinstance(raw, list):
            raise TraceError(f"{source} has no 'traceEvents' list; give a trace written by "
                             f"partition-model (simulate --trace) or the executor")
        events = []
        for j, ev in enumerate(raw):
            path = f"traceEvents[{j}]"
            if not isinstance(ev, dict):
                p.add(path, f"expected an object, got {show(ev)}")
                continue
            args = ev.get("args", {})
            if ev.get("ph") != "X" or not isinstance(args, dict) or "action" not in args:
                continue  # metadata, or an event the project did not write
            try:
                action = Action.parse(p.text(args["action"], f"{path}.args.action"))
            except ValueError as exc:
                p.add(f"{path}.args.action", str(exc))
                continue
            start = p.number(ev.get("ts"), f"{path}.ts", high=MAX_MS * 1e3) / 1e3
            length = p.number(ev.get("dur"), f"{path}.dur", high=MAX_MS * 1e3) / 1e3
            memory = args.get("memory_bytes")
            if memory is not None:
                memory = p.number(memory, f"{path}.args.memory_bytes")
            events.append(Event(action, start, start + length, memory))
        other = dict(p.mapping(data.get("otherData", {}), "otherData", "the trace's figures"))
        top = 1 + max((e.action.stage for e in events), default=0)
        stages = p.whole(other.pop("stages", top), "otherData.stages", low=1, high=2**20)
        if events and stages < top:
            p.add("otherData.stages", f"{stages} stages, but an event belongs to stage "
                                      f"{top - 1}")
        kind = p.text(other.pop("kind", "measured"), "otherData.kind", "measured")
        placement = _placement(other.pop("placement", []), stages, p)
        if p:
            raise TraceError(f"{source} is not a valid trace ({len(p)} problem(s)):\n  "
                             + "\n  ".join(p[:50]))
        return Timeline(stages, tuple(events), kind, other, placement)


def _placement(raw: object, stages: int, p: Problems) -> tuple[int, ...]:
    """``otherData.placement``: the rank of each stage, ranks 0..R-1 each running some."""
    if not isinstance(raw, list) or (raw and len(raw) != stages):
        p.add("otherData.placement", f"{show(raw)} is not a list of one rank per stage "
                                     f"({stages} stages)")
        return ()
    ranks = tuple(p.whole(r, f"otherData.placement[{k}]", high=stages - 1)
                  for k, r in enumerate(raw))
    if ranks and set(ranks) != set(range(max(ranks) + 1)):
        p.add("otherData.placement", f"{list(ranks)} leaves ranks without a stage; number "
                                     f"the ranks 0..R-1")
    return ranks


def save_chrome_trace(timeline: Timeline, path: str | Path) -> None:
    """Write the trace; it opens in Perfetto (https://ui.perfetto.dev) or chrome://tracing."""
    Path(path).write_text(json.dumps(timeline.to_chrome_trace()) + "\n")


def load_chrome_trace(path: str | Path) -> Timeline:
    """Read a trace written by ``save_chrome_trace`` back into a Timeline."""
    data = read_json(path, "trace", TraceError)
    if not isinstance(data, dict):
        raise TraceError(f"trace file {str(path)!r} is not a JSON object; give a trace written "
                         f"by partition-model (simulate --trace) or the executor")
    return Timeline.from_chrome_trace(data, f"trace file {str(path)!r}")
