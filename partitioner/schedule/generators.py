"""Schedule generators: small pure functions of K and M, one per schedule a plan can name.

    >>> print(gpipe(stages=2, microbatches=3).grid())
    t  stage0  stage1
    0  0F0
    1  0F1     1F0
    2  0F2     1F1
    3          1F2
    4          1B2
    5  0B2     1B1
    6  0B1     1B0
    7  0B0

``in_flight`` is the one rule for how many micro-batches' activations a stage holds at once
under each schedule; the cost model and the memory checks call it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

from partitioner.schedule.ir import Action, Schedule

__all__ = ["MAX_MICROBATCHES", "SCHEDULES", "ScheduleName", "gpipe", "in_flight", "make_schedule", "one_f_one_b"]

ScheduleName = Literal["gpipe", "1f1b"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)
#: The most micro-batches a step may have (a plan, a cost model, a schedule).
MAX_MICROBATCHES = 2**16


def gpipe(stages: int, microbatches: int) -> Schedule:
    """Fill-drain (GPipe paper, Figure 2): every stage runs all forwards, then all backwards in
    reverse micro-batch order; stage k holds M micro-batches of activations at its peak."""
    _check_sizes(stages, microbatches)
    m = microbatches
    acts = tuple(tuple([Action("F", k, i) for i in range(m)] +
                       [Action("B", k, i) for i in reversed(range(m))]) for k in range(stages))
    return Schedule("gpipe", stages, m, acts)


def one_f_one_b(stages: int, microbatches: int) -> Schedule:
    """One-forward-one-backward: stage k runs min(K-k-1, M) warm-up forwards, then alternates a
    forward and a backward, then drains; same bubble as GPipe, at most min(K-k, M) micro-batches
    in flight on stage k."""
    _check_sizes(stages, microbatches)
    m = microbatches
    rows = []
    for k in range(stages):
        warm = min(stages - k - 1, m)
        row = [Action("F", k, i) for i in range(warm)]
        for i in range(m - warm):
            row += [Action("F", k, warm + i), Action("B", k, i)]
        row += [Action("B", k, i) for i in range(m - warm, m)]
        rows.append(tuple(row))
    return Schedule("1f1b", stages, m, tuple(rows))


_GENERATORS: dict[str, Callable[[int, int], Schedule]] = {"gpipe": gpipe, "1f1b": one_f_one_b}
assert tuple(_GENERATORS) == SCHEDULES


def make_schedule(name: str, stages: int, microbatches: int) -> Schedule:
    """The schedule a plan names (``gpipe`` or ``1f1b``)."""
    if name not in _GENERATORS:
        raise ValueError(f"schedule {name!r} is unknown; use one of {', '.join(_GENERATORS)}")
    return _GENERATORS[name](stages, microbatches)


def _check_sizes(stages: int, microbatches: int) -> None:
    if stages < 1 or not 1 <= microbatches <= MAX_MICROBATCHES:
        raise ValueError(f"a schedule needs K >= 1 stages and 1 <= M <= {MAX_MICROBATCHES} "
                         f"micro-batches, got K={stages}, M={microbatches}")



def in_flight(schedule: str, stage: int, stages: int, microbatches: int) -> int:
    """Micro-batches whose activations stage k holds at once: M under GPipe (all forwards
    first), min(K-k, M) under 1F1B (warm-up forwards, then one backward per forward).

        >>> in_flight("gpipe", 0, 4, 8), in_flight("1f1b", 0, 4, 8), in_flight("1f1b", 3, 4, 8)
        (8, 4, 1)
    """
    if schedule not in _GENERATORS:
        raise ValueError(f"schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if schedule == "1f1b":
        return min(stages - stage, microbatches)
    return microbatches
