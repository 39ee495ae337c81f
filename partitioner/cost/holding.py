"""What a named schedule holds per stage: micro-batches in flight, rebuilt ones, stage ranks.

    >>> h = holding("zb-h1", stages=3, microbatches=8)
    >>> h.splits, h.in_flight, h.rebuilt, h.rank_of
    (True, (3, 3, 3), (1, 2, 3), (0, 1, 2))
    >>> h.states[1]                  # (before I, between I and W, one rebuilding)
    ((1, 2, 0), (2, 1, 1))
    >>> h.activation_bytes(1, held=10.0, held_for_w=4.0, rebuilt=30.0)
    54.0

The memory rules these counts feed (``CostModel.stage_memory_bytes``; the simulator replays
the same rules action by action):

- A micro-batch holds its activations on stage k (``held``) from its F until its B or, when
  its backward is split, until its I; from I until W it holds what the weight gradient needs
  (``held_for_w``: ``cost.activations``). ``in_flight`` is the most micro-batches between F
  and W (or B) at once (``generators.in_flight``).
- A recomputing stage holds only its stash from F on, and rebuilds the saved activations at
  the start of B (or I, where the recomputation happens), for that action (``rebuilt`` bytes
  on top). ``rebuilt`` (the count) is the most micro-batches at once that are being rebuilt or
  wait between I and W: 1 without a split (one B at a time), and under ZB-H1 or ZB-V as many
  as have run I but not yet W, and one more rebuilding.
- ``states[k]``: the counts (before I or B, between I and W, rebuilding now: 0 or 1) at each
  moment stage k's memory may peak, those no other state exceeds in all three; the stage's
  peak is the largest ``a held + b held_for_w + t rebuilt`` over them (``activation_bytes``),
  what the simulator's replay of the schedule reaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from partitioner.schedule.generators import (
    counting_microbatches,
    in_flight,
    make_schedule,
    peak_in_flight,
    v_placement,
)
from partitioner.schedule.ir import Schedule

__all__ = ["SPLIT_SCHEDULES", "Holding", "holding", "peak_rebuilt", "peak_states"]

#: (before I or B, between I and W, rebuilding now) micro-batch counts of one stage.
State = tuple[int, int, int]

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
    states: tuple[tuple[State, ...], ...]

    def activation_bytes(self, stage: int, held: float, held_for_w: float,
                         rebuilt: float) -> float:
        """Stage k's peak activations when one micro-batch holds ``held`` bytes until its I
        (or B), ``held_for_w`` from I until W, and a rebuild adds ``rebuilt`` on top."""
        states = self.states[stage]
        if len(states) == 1:  # GPipe's and 1F1B's: no generator for the common case
            a, b, t = states[0]
            return a * held + b * held_for_w + t * rebuilt
        return max(a * held + b * held_for_w + t * rebuilt for a, b, t in states)

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


def _frontier(found: set[State]) -> tuple[State, ...]:
    """The states of ``found`` that no other one exceeds (or equals) in every count, in one
    sweep by decreasing a (t is 0 or 1: a state with t = 1 is exceeded only by one with t = 1
    and a greater a, one with t = 0 also by one of t = 1 and an equal a)."""
    top: dict[tuple[int, int], int] = {}  # of the states with the same (a, t), the largest b
    for a, b, t in found:
        top[a, t] = max(b, top.get((a, t), b))
    kept = []
    beyond = [-1, -1]  # per t, the largest b of the states with a greater a
    for a in sorted({a for a, _ in top}, reverse=True):
        b0, b1 = top.get((a, 0)), top.get((a, 1))
        if b1 is not None and beyond[1] < b1:
            kept.append((a, b1, 1))
        if b0 is not None and max(beyond[0], beyond[1], -1 if b1 is None else b1) < b0:
            kept.append((a, b0, 0))
        beyond = [max(beyond[0], -1 if b0 is None else b0),
                  max(beyond[1], -1 if b1 is None else b1)]
    return tuple(sorted(kept))


def peak_states(sched: Schedule) -> tuple[tuple[State, ...], ...]:
    """Per stage, the states (see module docstring) at which its memory may peak in ``sched``,
    replayed action by action.

        >>> from partitioner.schedule.generators import one_f_one_b, zb_h1
        >>> peak_states(one_f_one_b(2, 4)), peak_states(zb_h1(2, 4))[1]
        ((((2, 0, 1),), ((1, 0, 1),)), ((0, 2, 0), (1, 1, 1)))
    """
    before, after = [0] * sched.stages, [0] * sched.stages
    found: list[set[State]] = [set() for _ in range(sched.stages)]
    for row in sched.actions:
        for act in row:
            k = act.stage
            if act.kind == "F":
                before[k] += 1
                found[k].add((before[k], after[k], 0))
            elif act.kind in ("B", "I"):
                found[k].add((before[k], after[k], 1))
                before[k] -= 1
                if act.kind == "I":
                    after[k] += 1
                    found[k].add((before[k], after[k], 0))
            elif act.kind == "W":
                after[k] -= 1
    return tuple(_frontier(f) if f else ((0, 0, 0),) for f in found)


@lru_cache(maxsize=1024)
def holding(name: str, stages: int, microbatches: int, stages_per_rank: int = 1) -> Holding:
    """The counts of schedule ``name`` for K stages, M micro-batches, V stages per rank: the
    closed forms of GPipe, 1F1B, ZB-H1 (in flight min(K, M) on every stage, rebuilt
    max(1, min(K, M) - (K-1-k))) and ZB-V with M >= R (``_zbv_holding``), the replay of the
    generated schedule for the others (as ``generators.in_flight`` replays it), of at most 2R
    micro-batches (``generators.counting_microbatches``)."""
    big_k, m, v = stages, microbatches, stages_per_rank
    if name in ("gpipe", "1f1b"):  # the peak: the first B, every F so far still held
        flight = tuple(in_flight(name, k, big_k, m, v) for k in range(big_k))
        return Holding(False, flight, (1,) * big_k, tuple(range(big_k)),
                       tuple(((f, 0, 1),) for f in flight))
    if name == "zb-h1":  # closed forms, tested against the generator's replay
        most = min(big_k, m)  # the drain's waiting W keep every stage at min(K, M)
        rebuilt = tuple(max(1, most - (big_k - 1 - k)) for k in range(big_k))
        states = tuple(((most - q, q, 0), (most - q + 1, q - 1, 1)) for q in rebuilt)
        return Holding(True, (most,) * big_k, rebuilt, tuple(range(big_k)), states)
    if name == "zbv" and m >= big_k // 2:  # closed forms, tested against the replay
        return _zbv_holding(big_k // 2)
    return _replayed_holding(name, big_k, counting_microbatches(name, big_k, m, v), v)


def _zbv_holding(ranks: int) -> Holding:
    """ZB-V's counts for M >= R (constant in M): R in flight on every stage; on stage k < R
    of the way down q = k+1 waiting W or rebuilding at most, states (R-q, q, 0) and
    (R-j, j, 1) for j < q; on the way up (p = 2R-1-k stages from the end) (0, R, 0) and
    (R-j, j, 1) for R-1-p <= j < R."""
    big_r, big_k = ranks, 2 * ranks
    states = []
    for k in range(big_k):
        if k < big_r:
            found = [(big_r - k - 1, k + 1, 0)] + [(big_r - j, j, 1) for j in range(k + 1)]
        else:
            low = big_r - 1 - (big_k - 1 - k)
            found = [(0, big_r, 0)] + [(big_r - j, j, 1) for j in range(low, big_r)]
        states.append(tuple(sorted(found)))
    return Holding(True, (big_r,) * big_k, tuple(min(k + 1, big_r) for k in range(big_k)),
                   v_placement(big_r), tuple(states))


@lru_cache(maxsize=4096)  # a search asks for many M that count as the same few
def _replayed_holding(name: str, stages: int, microbatches: int, stages_per_rank: int) -> Holding:
    sched = make_schedule(name, stages, microbatches, stages_per_rank)  # once for all counts
    return Holding(bool(sched.split), peak_in_flight(sched), peak_rebuilt(sched), sched.rank_of,
                   peak_states(sched))
