"""Measure a stage's actions: start and end of each (and memory on CUDA), as timeline events.

    >>> from partitioner.schedule.ir import Action
    >>> rec = Recorder(torch.device("cpu")); rec.reset(time.perf_counter())
    >>> with rec.record(Action("F", 0, 0)):
    ...     _ = sum(range(1000))
    >>> [str(e.action) for e in rec.events()], rec.events()[0].end_ms >= 0
    (['0F0'], True)

Times are milliseconds after a host time origin ``t0`` that the runner chooses (on several ranks:
the moment each leaves a common barrier; the distributed runner then moves the events of ranks
on rank 0's host onto rank 0's ``t0``, their monotonic clocks being one), so the events of all
stages share one clock. On CPU an
action is timed with the host's monotonic clock; on CUDA with events on the stage's device,
read once at the end of the step (no synchronisation per action).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from partitioner.formats.timeline import Event
from partitioner.schedule.ir import Action

__all__ = ["Recorder"]


class Recorder:
    """Records the actions of one stage on ``device``; ``reset(t0)`` starts a new step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._t0 = 0.0
        self._origin: torch.cuda.Event | None = None
        self._origin_ms = 0.0
        self._host: list[tuple[Action, float, float]] = []
        self._gpu: list[tuple[Action, torch.cuda.Event, torch.cuda.Event, float]] = []

    def reset(self, t0_s: float) -> None:
        """Forget earlier events; times will count from the host time ``t0_s`` (perf_counter)."""
        self._t0 = t0_s
        self._host, self._gpu = [], []
        if self._cuda:
            self._origin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            self._origin.record(torch.cuda.current_stream(self.device))
            self._origin_ms = (time.perf_counter() - t0_s) * 1e3

    @contextmanager
    def record(self, action: Action) -> Iterator[None]:
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            start, end = (torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                          for _ in range(2))
            start.record(stream)
            yield
            end.record(stream)
            self._gpu.append((action, start, end, float(torch.cuda.memory_allocated(self.device))))
        else:
            begin = time.perf_counter()
            yield
            self._host.append((action, begin, time.perf_counter()))

    @property
    def t0_s(self) -> float:
        """The host time (perf_counter) the step's times count from."""
        return self._t0

    def events(self) -> list[Event]:
        """The step's events so far, in milliseconds from ``t0``."""
        out = [Event(a, (s - self._t0) * 1e3, (e - self._t0) * 1e3) for a, s, e in self._host]
        if self._gpu and self._origin is not None:
            torch.cuda.synchronize(self.device)
            base, origin = self._origin_ms, self._origin
            out += [Event(a, base + origin.elapsed_time(s), base + origin.elapsed_time(e), mem)
                    for a, s, e, mem in self._gpu]
        return out
