"""The recorder: events per action, in milliseconds from the step's origin."""

from __future__ import annotations

import time

import torch

from executor.runtime.recorder import Recorder
from partitioner.schedule.ir import Action


def test_events_are_timed_from_the_origin() -> None:
    rec = Recorder(torch.device("cpu"))
    t0 = time.perf_counter()
    rec.reset(t0)
    time.sleep(0.01)
    with rec.record(Action("F", 0, 0)):
        time.sleep(0.02)
    (event,) = rec.events()
    assert event.start_ms >= 9.5 and event.duration_ms >= 19.5 and event.memory_bytes is None
    rec.reset(time.perf_counter())
    assert rec.events() == []
