"""What a search keeps between configurations: the partitions solved, and the table to beat.

    >>> table = Leaders(keep=2)           # the two fastest, and the fastest with D = 1
    >>> for step, d in ((5.0, 2), (3.0, 2), (6.0, 1)):
    ...     table.add(step, stages=2, replicas=d, synth_key=None)
    >>> table.beaten(5.5, stages=2, replicas=2), table.beaten(5.5, stages=2, replicas=1)
    (True, False)

``Leaders`` says when a configuration whose step is at least some bound cannot change what a
search reports: the ``keep`` fastest (with the fastest few distinct configurations that a
synthesised schedule refines among them), the fastest with D = 1 and the fastest with K = 1.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from partitioner.cost.model import CostModel
from partitioner.cost.partition import Solution, recost
from partitioner.solve.bounds import SLACK
from partitioner.solve.infeasible import InfeasibleError

__all__ = ["Leaders", "PartitionCache", "PartitionFn"]

#: Any solver with ``partition_chain``'s signature: (cost model, memory limit in bytes) ->
#: stages as cut points or node sets, raising ``InfeasibleError`` when nothing fits (and
#: ``ilp.SolveTimeoutError`` when it found nothing in time).
PartitionFn = Callable[[CostModel, float], Solution]


class Leaders:
    """The steps found so far, and whether a bound proves a configuration cannot be among
    the ``keep`` fastest, the first ``synth`` distinct ``synth_key``s by step, the fastest
    with one replica or the fastest with one stage."""

    def __init__(self, keep: int, synth: int = 0) -> None:
        self.keep, self.synth = keep, synth
        self.steps: list[float] = []
        self.keyed: list[tuple[float, int, object]] = []  # (step, order found, key)
        self.pure = {"D": math.inf, "K": math.inf}
        self.bar = math.inf

    def add(self, step: float, stages: int, replicas: int, synth_key: object) -> None:
        """A candidate found: its step, K, D and what ``_synthesise_best`` groups it by."""
        if replicas == 1:
            self.pure["D"] = min(self.pure["D"], step)
        if stages == 1:
            self.pure["K"] = min(self.pure["K"], step)
        if step > self.bar:
            return
        bisect.insort(self.steps, step)
        bisect.insort(self.keyed, (step, len(self.keyed), synth_key))
        bar = self.steps[self.keep - 1] if len(self.steps) >= self.keep else math.inf
        if self.synth:
            seen: set[object] = set()
            synth_bar = math.inf
            for s, _, key in self.keyed:
                seen.add(key)
                if len(seen) == self.synth:
                    synth_bar = s
                    break
            bar = max(bar, synth_bar)
        self.bar = bar

    def beaten(self, bound: float, stages: int, replicas: int) -> bool:
        """Whether a step of at least ``bound`` is provably slower than all it could change."""
        bar = self.bar
        if replicas == 1:
            bar = max(bar, self.pure["D"])
        if stages == 1:
            bar = max(bar, self.pure["K"])
        return bound > bar * (1 + SLACK) + 1e-12


#: What a schedule holds, as the memory rules read it: per stage its states, the counts of
#: micro-batches in flight and rebuilt with V, and whether it splits (``cost.holding``).
_Held = tuple[tuple[tuple[tuple[int, int, int], ...], ...], tuple[int, ...], bool]


def _holds_more(held: _Held, fewer: _Held) -> bool:
    """Whether ``held`` holds at least what ``fewer`` does, everywhere: each of its counts as
    large, each stage's every state of ``fewer`` matched by one as large in all three counts
    (so every memory figure of a partition is as large under ``held``)."""
    states, counts, splits = held
    f_states, f_counts, f_splits = fewer
    return splits == f_splits and all(h >= f for h, f in zip(counts, f_counts, strict=True)) \
        and all(all(any(all(x >= y for x, y in zip(s, t, strict=True)) for s in mine)
                    for t in theirs) for mine, theirs in zip(states, f_states, strict=True))


class PartitionCache:
    """Partitions solved so far (see the module docstring): without a memory limit by (K, b,
    recompute); with it by (K, b, recompute, micro-batches in flight per stage), and where
    nothing fits, so that holding as many or more micro-batches on every stage is known not
    to fit either (a stage's memory grows with them; the partition function is trusted to
    report infeasibility exactly)."""

    def __init__(self, partition: PartitionFn) -> None:
        self.partition, self.solves = partition, 0
        self.relaxed: dict[tuple[object, ...], Solution] = {}
        self.limited: dict[tuple[object, ...], Solution | str] = {}
        self.infeasible: dict[tuple[object, ...], list[_Held]] = {}
        # per key, the counts of each of its infeasible helds as one row: one comparison
        # finds those whose counts the new one reaches (only they need the states compared)
        self.infeasible_counts: dict[tuple[object, ...], npt.NDArray[np.int64]] = {}

    def solve(self, cm: CostModel, limit: float) -> Solution | str:
        """A partition fitting ``limit``, or ``infeasible`` / ``timeout``."""
        key = (cm.stages, cm.microbatch_size, cm.recompute, cm.splits_backward, cm.link,
               cm.replicas if cm.shard_optimizer else 1)
        limit = limit / cm.stages_per_rank  # each of a rank's V stages: a V-th of its memory
        if key not in self.relaxed:
            self.solves += 1
            self.relaxed[key] = self.partition(cm, math.inf)
        sol = recost(cm, self.relaxed[key])  # this M's memory on those stages
        if max(sol.stage_memory_bytes) <= limit:
            return sol
        hold = cm.holding
        held = (hold.states, hold.in_flight + hold.rebuilt + (cm.stages_per_rank,), hold.splits)
        if key in self.infeasible:
            reached = np.all(self.infeasible_counts[key] <= np.asarray(held[1]), axis=1)
            if any(_holds_more(held, self.infeasible[key][j]) for j in np.flatnonzero(reached)):
                return "infeasible"  # memory only grows with the micro-batches held
        if (*key, held) not in self.limited:
            self.solves += 1
            try:
                self.limited[(*key, held)] = self.partition(cm, limit)
            except InfeasibleError:
                self.limited[(*key, held)] = "infeasible"
            except ValueError as exc:
                from partitioner.solve.ilp import SolveTimeoutError  # only the ILP raises it

                if not isinstance(exc, SolveTimeoutError):
                    raise
                self.limited[(*key, held)] = "timeout"
        found = self.limited[(*key, held)]
        if found == "infeasible":
            self.infeasible.setdefault(key, []).append(held)
            row = np.asarray([held[1]], dtype=np.int64)
            known = self.infeasible_counts.get(key)
            self.infeasible_counts[key] = row if known is None else np.vstack([known, row])
        return found if isinstance(found, str) else recost(cm, found)
