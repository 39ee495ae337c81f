"""What a named schedule holds per stage: micro-batches in flight, rebuilt ones, stage ranks.

    >>> h = holding("zb-h1", stages=3, microbatches=8)
    >>> h.splits, h.in_flight, h.rebuilt, h.rank_of
    (True, (3, 3, 3), (1, 2, 3), (0, 1, 2))

The memory rules these counts feed (``CostModel.stage_memory_bytes``; the simulator replays
the same rules action by action):

- A micro-batch holds its activations on stage k from its F until its B or, when its backward
  is split, until its W: the weight gradient needs the layer inputs the forward saved, so
  they all stay until W runs (conservative: an input gradient may free some of them early,
  the model does not count on it). ``in_flight`` is the most micro-batches held at once
  (``generators.in_flight``).
- A recomputing stage holds only its stash from F on, and rebuilds the saved activations at
  the start of B (or I, where the recomputation happens); they stay until B ends (or until W).
  ``rebuilt`` is the most micro-batches held rebuilt at once: 1 without a split (one B at a
  time), and under ZB-H1 or ZB-V as many as have run I but not yet W.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from partitioner.schedule.generators import in_flight, make_schedule, peak_in_flight
from partitioner.schedule.ir import Schedule

__all__ = ["SPLIT_SCHEDULES", "Holding", "holding", "peak_rebuilt"]

#: The named schedules that split every backward into I and W.
SPLIT_SCHEDULES: frozenset[str] = frozenset({"zb-h1", "zbv"})


@dataclass(frozen=True)
class Holding:
    """Per stage k: ``in_flight[k]`` and ``rebuilt[k]`` (see module docstring) and the rank
    ``rank_of[k]`` that runs it; ``splits``: whether the backwards are split into I and W."""

    splits: bool
    in_flight: tuple[int, ...]
    rebuilt: tuple[int, ...]
    rank_of: tuple[int, ...]

    @property
    def ranks(self) -> int:
        """R: the ranks that run the stages."""
        return max(self.rank_of) + 1 if self.rank_of else 0


def peak_rebuilt(sched: Schedule) -> tuple[int, ...]:
    """Per stage, the most micro-batches whose rebuilt activations a recomputing stage holds at
    once in ``sched``: from I until W, or during B (the micro-batch B runs, plus any waiting
    for their W).

        >>> from partitioner.schedule.generators import one_f_one_b, zb_h1
        >>> peak_rebuilt(one_f_one_b(2, 4)), peak_rebuilt(zb_h1(2, 4))
        ((1, 1), (1, 2))
    """
    live, peak = [0] * sched.stages, [0] * sched.stages
    for row in sched.actions:
        for a in row:
            k = a.stage
            if a.kind == "B":
                peak[k] = max(peak[k], live[k] + 1)
            elif a.kind == "I":
                live[k] += 1
                peak[k] = max(peak[k], live[k])
            elif a.kind == "W":
                live[k] -= 1
    return tuple(peak)


@lru_cache(maxsize=1024)
def holding(name: str, stages: int, microbatches: int, stages_per_rank: int = 1) -> Holding:
    """The counts of schedule ``name`` for K stages, M micro-batches, V stages per rank: the
    closed forms of GPipe, 1F1B and ZB-H1 (in flight min(K, M) on every stage, rebuilt
    max(1, min(K, M) - (K-1-k))), the replay of the generated schedule for the others (as
    ``generators.in_flight`` replays it)."""
    big_k, m, v = stages, microbatches, stages_per_rank
    if name in ("gpipe", "1f1b"):
        flight = tuple(in_flight(name, k, big_k, m, v) for k in range(big_k))
        return Holding(False, flight, (1,) * big_k, tuple(range(big_k)))
    if name == "zb-h1":  # closed forms, tested against the generator's replay
        most = min(big_k, m)  # the drain's waiting W keep every stage at min(K, M)
        rebuilt = tuple(max(1, most - (big_k - 1 - k)) for k in range(big_k))
        return Holding(True, (most,) * big_k, rebuilt, tuple(range(big_k)))
    sched = make_schedule(name, big_k, m, v)  # generated once for all three counts
    return Holding(bool(sched.split), peak_in_flight(sched), peak_rebuilt(sched), sched.rank_of)
