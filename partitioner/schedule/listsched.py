"""The list scheduler: builds a schedule by replaying time, one ready action at a time per rank.

    >>> sched = list_schedule(Costs.uniform(2, 1), placement=(0, 1), microbatches=2, caps=(2, 2))
    >>> str(sched)
    '0: 0F0 0F1 0I0 0W0 0I1 0W1\\n1: 1F0 1I0 1F1 1I1 1W0 1W1'

Each rank, whenever it is free, runs the action that is ready soonest; among actions ready at
the same time an input gradient (I, or a full B) comes first (it is on the critical path: an
earlier stage waits for it), then a forward (the deepest stage's first, so that the pipeline
fills towards its end), then a weight gradient (W: it waits for nobody, so it fills what would
otherwise be idle time). A stage starts the forward of a new micro-batch only while fewer than
``caps[k]`` of its micro-batches are in flight (forward run, weight gradient not yet), which
bounds its activation memory; the last stage's micro-batches always drain, so the replay never
deadlocks. Times are in any unit (``Costs``), communication included; ``zbv`` uses unit times,
``synthesis.synthesise`` measured ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from partitioner.schedule.ir import Action, Schedule

__all__ = ["Costs", "Replayed", "list_schedule", "replay", "timed"]


@dataclass(frozen=True)
class Costs:
    """Per stage k: forward, input-gradient and weight-gradient time of one micro-batch, and the
    time a message takes to reach stage k+1 (forward) or k-1 (gradient) from stage k; ``split``
    False runs full backwards B taking ``input_ms + weight_ms``."""

    fwd_ms: tuple[float, ...]
    input_ms: tuple[float, ...]
    weight_ms: tuple[float, ...]
    send_f_ms: tuple[float, ...]
    send_b_ms: tuple[float, ...]
    split: bool = True

    @staticmethod
    def uniform(stages: int, unit: float = 1.0, split: bool = True) -> Costs:
        """F = I = W = ``unit`` on every stage, free links."""
        same = (unit,) * stages
        zero = (0.0,) * stages
        return Costs(same, same, same, zero, zero, split)

    @property
    def stages(self) -> int:
        return len(self.fwd_ms)


def list_schedule(costs: Costs, placement: Sequence[int], microbatches: int,
                  caps: Sequence[int], name: str = "listed", priority: str = "IFW",
                  deep_inputs_first: bool = False) -> Schedule:
    """The schedule the replay above builds for K = ``costs.stages`` stages on the ranks of
    ``placement`` (stage k on rank ``placement[k]``), M micro-batches, at most ``caps[k]``
    micro-batches in flight on stage k (each cap >= 1). ``priority`` orders the kinds among
    actions ready at the same time (default input gradients, forwards, weight gradients);
    forwards go deepest stage first, input gradients shallowest first unless
    ``deep_inputs_first``."""
    return replay(costs, placement, microbatches, caps, name, priority, deep_inputs_first)[0]


class Replayed(NamedTuple):
    """A replay's schedule, the step it took, and per stage k the caps (low, high) for which
    the replay is the same: any caps with low[k] <= caps[k] <= high[k] on every stage make
    this very schedule (a cap only matters where it stopped a forward, or would have)."""

    schedule: Schedule
    step: float
    same_caps: tuple[tuple[int, int], ...]


def replay(costs: Costs, placement: Sequence[int], microbatches: int, caps: Sequence[int],
           name: str = "listed", priority: str = "IFW",
           deep_inputs_first: bool = False) -> Replayed:
    """``list_schedule``'s schedule and the step it took in the replay (a send occupies its
    sender, as in the simulator; a message between stages of one rank is free), and the caps
    that make the same replay. Those: the replay depends on ``caps[k]`` only through the test
    "fewer than caps[k] in flight" each time stage k's next forward is ready; a cap above
    every count it allowed and at most every count it refused passes the same tests."""
    if sorted(priority) != ["F", "I", "W"]:
        raise ValueError(f"priority {priority!r} must order the kinds I, F and W, e.g. 'IFW'")
    rule = {c: priority.index(c) for c in "IFW"}
    big_k, m = costs.stages, microbatches
    if len(placement) != big_k or len(caps) != big_k or min(caps, default=1) < 1 or m < 1:
        raise ValueError(f"list_schedule needs one rank and one cap >= 1 per stage and M >= 1; "
                         f"got K={big_k}, placement {list(placement)}, caps {list(caps)}, M={m}")
    ranks = max(placement) + 1
    on_rank = [[k for k in range(big_k) if placement[k] == r] for r in range(ranks)]
    free = [0.0] * ranks
    done = {"F": [0] * big_k, "I": [0] * big_k, "W": [0] * big_k}
    done_f, done_i, done_w = done["F"], done["I"], done["W"]
    # arrived[kind][k][i]: when stage k's output of micro-batch i is there (F: at k+1, I: at
    # k-1), None until it was sent
    arrived: dict[str, list[list[float | None]]] = {
        kind: [[None] * m for _ in range(big_k)] for kind in "FI"}
    arrived_f, arrived_i = arrived["F"], arrived["I"]
    rows: list[list[Action]] = [[] for _ in range(ranks)]
    last = big_k - 1
    rule_i, rule_f, rule_w = rule["I"], rule["F"], rule["W"]
    split = costs.split
    Choice = tuple[float, int, int, int, str]  # (start, rule, order, k, kind)
    allowed = [0] * big_k  # per stage, the most in flight while a ready forward was let start
    refused = [m + 1] * big_k  # and the fewest in flight while one was kept from starting

    def choice(k: int) -> Choice | None:
        """Stage k's first action by (start, rule, order): these three never tie between two
        actions (rule is the kind's, order the stage's within a kind), so the smallest over
        the stages is the one the rule picks."""
        n_f, n_i, n_w = done_f[k], done_i[k], done_w[k]
        at, out = free[placement[k]], None
        if n_i < n_f:
            ready = arrived_i[k + 1][n_i] if k < last else arrived_f[k][n_i]
            if ready is not None:
                out = (at if at > ready else ready, rule_i, -k if deep_inputs_first else k,
                       k, "I")
        if n_f < m:
            ready = arrived_f[k - 1][n_f] if k > 0 else 0.0
            if ready is not None:
                held = n_f - n_w
                if held < caps[k]:
                    if held > allowed[k]:
                        allowed[k] = held
                    cand = (at if at > ready else ready, rule_f, -k, k, "F")
                    out = cand if out is None or cand < out else out
                elif held < refused[k]:
                    refused[k] = held
        if split and n_w < n_i:
            cand = (at, rule_w, k, k, "W")
            out = cand if out is None or cand < out else out
        return out

    # each stage's next choice, refreshed only where an action changed what it depends on: its
    # rank's free time, its own counts, its neighbours' messages; a heap of them, where an
    # entry whose stage has been refreshed since (its version is not the stage's) is stale
    version = [0] * big_k
    heap: list[tuple[float, int, int, int, str, int]] = []
    for k in range(big_k):
        c = choice(k)
        if c is not None:
            heap.append((*c, 0))
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    # per kind and stage: the stages its action refreshes (those of its rank, whose free time
    # it moves, and the neighbour its message reaches: k+1 after an F, k-1 after an I), what
    # it takes, and the message time it adds (0 where the neighbour is on the same rank or
    # there is none)
    touched = {kind: [tuple(sorted({*on_rank[placement[k]], *(
        [k + step] if 0 <= k + step < big_k else [])})) for k in range(big_k)]
        for kind, step in (("F", 1), ("I", -1), ("W", 0))}
    took = {"F": costs.fwd_ms, "I": costs.input_ms, "W": costs.weight_ms}
    sends = {"F": [costs.send_f_ms[k] if k < last and placement[k + 1] != placement[k] else 0.0
                   for k in range(big_k)],
             "I": [costs.send_b_ms[k] if k > 0 and placement[k - 1] != placement[k] else 0.0
                   for k in range(big_k)]}
    written = {"F": "F", "I": "I" if split else "B", "W": "W"}
    for _ in range(big_k * m * (3 if split else 2)):
        while heap and heap[0][5] != version[heap[0][3]]:
            pop(heap)
        assert heap, "the list scheduler found nothing to run"  # see docstring
        start, _, _, k, kind, _ = pop(heap)
        r, counts = placement[k], done[kind]
        i = counts[k]
        end = start + took[kind][k]
        if kind == "I" and not split:  # a full B: the weight gradient with it
            end += costs.weight_ms[k]
            done_w[k] += 1
        if kind != "W":
            end += sends[kind][k]
            arrived[kind][k][i] = end
        counts[k] = i + 1
        rows[r].append(Action(written[kind], k, i))  # type: ignore[arg-type]
        free[r] = end
        for j in touched[kind][k]:
            version[j] += 1
            c = choice(j)
            if c is not None:
                push(heap, (*c, version[j]))
    identity = tuple(placement) == tuple(range(big_k))
    sched = Schedule(name, big_k, m, tuple(map(tuple, rows)), () if identity else tuple(placement))
    same = tuple((allowed[k] + 1, refused[k]) for k in range(big_k))
    return Replayed(sched, max(free), same)


def timed(costs: Costs, sched: Schedule) -> float:
    """The step any (unlowered) schedule takes under ``costs`` by the replay's rules: each rank
    runs its row in order, an action starts once its rank is free and what it needs arrived.

        >>> from partitioner.schedule.generators import one_f_one_b
        >>> timed(Costs.uniform(3, split=False), one_f_one_b(3, 4))  # F = 1, B = 2: 3(M+K-1)
        18.0
    """
    big_k, rank_of = sched.stages, sched.rank_of
    arrived: dict[tuple[str, int, int], float] = {}
    free, pos = [0.0] * sched.ranks, [0] * sched.ranks
    left = sum(len(row) for row in sched.actions)
    while left:
        moved = False
        for r, row in enumerate(sched.actions):
            while pos[r] < len(row):
                a = row[pos[r]]
                k, i = a.stage, a.microbatch
                if a.kind == "F":
                    need = arrived.get(("F", k - 1, i)) if k > 0 else 0.0
                    work, step = costs.fwd_ms[k], 1
                elif a.kind in ("B", "I"):
                    need = arrived.get(("B", k + 1, i)) if k < big_k - 1 else free[r]
                    work = costs.input_ms[k] + (costs.weight_ms[k] if a.kind == "B" else 0.0)
                    step = -1
                else:
                    need, work, step = free[r], costs.weight_ms[k], 0
                if need is None:
                    break
                end = max(free[r], need) + work
                if step and 0 <= k + step < big_k and rank_of[k + step] != r:
                    end += (costs.send_f_ms if step == 1 else costs.send_b_ms)[k]
                if step:
                    arrived["F" if step == 1 else "B", k, i] = end
                free[r], pos[r], left, moved = end, pos[r] + 1, left - 1, True
        if not moved:
            raise ValueError(f"schedule {sched.name!r} deadlocks; validate() names where")
    return max(free, default=0.0)
