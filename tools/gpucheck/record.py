"""The budget clock, the report every section writes into, and step timing that waits for the GPU.

    >>> budget = Budget(10.0)
    >>> budget.allows(3.0), budget.allows(60.0)
    (True, False)

A section is a function of a ``Section`` (its figures, its budget checks) and the ``Check``
context. ``Report.run`` starts it only when its first piece of work fits the budget, catches
whatever it raises (status ``error``, the traceback kept) and rewrites ``gpu_check.json`` after
every section and every piece of work inside one, so a run killed from outside still leaves
the figures taken so far. Statuses: ``ok`` (all of it ran), ``partial`` (some pieces skipped
for the budget), ``skipped`` (none ran), ``error``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpucheck.settings import Settings

__all__ = ["Budget", "Check", "Report", "Section", "sync", "time_steps"]


class Budget:
    """Seconds left of ``total_s`` since it was made; ``allows`` compares an estimate with them."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.start = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def left_s(self) -> float:
        return self.total_s - self.elapsed_s()

    def allows(self, estimate_s: float) -> bool:
        return estimate_s <= self.left_s()

    def skip_reason(self, what: str, estimate_s: float) -> str:
        return (f"skipped: budget ({what} needs about {estimate_s:.0f} s, "
                f"{max(self.left_s(), 0.0):.0f} s of {self.total_s:.0f} s left)")


@dataclass
class Check:
    """What every section gets: the settings, the device, the output folder, and what earlier
    sections left for later ones (``shared["profiles"]``: the profiles section (b) took)."""

    settings: Settings
    device: torch.device
    out: Path
    shared: dict[str, Any] = field(default_factory=dict)


class Section:
    """One section's figures (a dict in the report) and its budget checks."""

    def __init__(self, figures: dict[str, Any], budget: Budget, save: Callable[[], None]) -> None:
        self.figures = figures
        self.budget = budget
        self.save = save
        self._took: dict[str, float] = {}  # the longest piece of each kind so far, s

    def fits(self, what: str, estimate_s: float, kind: str = "") -> bool:
        """Whether ``what`` fits the budget, judged by the larger of ``estimate_s`` and the
        longest piece of the same ``kind`` so far; if not, the skip is recorded."""
        need = max(estimate_s, self._took.get(kind, 0.0))
        if self.budget.allows(need):
            return True
        self.figures.setdefault("skipped", []).append(f"{what}: "
                                                      + self.budget.skip_reason(what, need))
        self.save()
        return False

    @contextmanager
    def timing(self, kind: str) -> Iterator[None]:
        """Time a piece of work of ``kind`` (for later ``fits``) and save the report after it."""
        start = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - start
            self._took[kind] = max(self._took.get(kind, 0.0), took)
            self.save()


class Report:
    """``DIR/gpu_check.json``: the header (device, versions, settings) and one entry per section."""

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.path = out / "gpu_check.json"
        self.data: dict[str, Any] = {**header, "sections": {}}
        self.write()

    @property
    def sections(self) -> dict[str, dict[str, Any]]:
        sections: dict[str, dict[str, Any]] = self.data["sections"]
        return sections

    def write(self) -> None:
        """Rewrite the JSON whole (to a temporary file first: a kill never leaves half of it)."""
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)

    def skip(self, name: str, reason: str) -> None:
        self.sections[name] = {"status": "skipped", "reason": reason}
        self.write()

    def run(self, name: str, section: Callable[[Section, Check], None], check: Check,
            budget: Budget, first_s: float) -> None:
        """Run ``section`` if its first piece of work (``first_s``) fits the budget."""
        if not budget.allows(first_s):
            self.skip(name, budget.skip_reason(f"section {name}", first_s))
            return
        figures: dict[str, Any] = {"status": "running"}
        self.sections[name] = figures
        cuda = check.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(check.device)
        start = time.perf_counter()
        try:
            section(Section(figures, budget, self.write), check)
            figures["status"] = "partial" if figures.get("skipped") else "ok"
        except Exception as exc:  # one section's failure must not lose the others' figures
            figures["status"] = "error"
            figures["error"] = f"{type(exc).__name__}: {exc}"
            figures["traceback"] = traceback.format_exc()
        figures["elapsed_s"] = round(time.perf_counter() - start, 2)
        if cuda:
            figures["max_memory_allocated_bytes"] = int(
                torch.cuda.max_memory_allocated(check.device))
        self.data["elapsed_s"] = round(budget.elapsed_s(), 2)
        self.write()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device: torch.device, warmup: int,
               repeat: int) -> dict[str, float]:
    """Median and fastest wall time of ``step`` in ms, the device synchronised before and after
    each (the host's work and the device's both count), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}
