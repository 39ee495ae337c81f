"""Schedules synthesised from measured times: a list scheduler tuned by local search.

    >>> from partitioner.schedule.generators import one_f_one_b
    >>> costs = Costs((1.0, 1.0, 3.0), (1.0, 1.0, 2.0), (1.0, 1.0, 2.0), (0.0,) * 3, (0.0,) * 3)
    >>> found = synthesise(costs, (0, 1, 2), 6, baselines=[one_f_one_b(3, 6)])
    >>> found.step_ms < found.baseline_ms, found.schedule.name
    (True, 'synth')

The search, and why it is this one. A schedule is a permutation per rank of thousands of
actions; a CP-SAT model of the whole step is exact but its size grows with K x M and it proves
optimality only for small steps. Instead the list scheduler (``listsched``) turns a few knobs
into a complete, valid, deadlock-free schedule that adapts to the measured times: how many
micro-batches each stage may hold (``caps``: its memory) and which kind goes first when several
are ready (``priority``). The search starts from the caps of the known schedules (1F1B's K-k,
ZB-H1's K, a V-shape's R, and as many as memory allows) and climbs: it changes one stage's cap
by one, keeps the change when the *evaluated* step (the caller's simulator: ``evaluate``) gets
shorter and the schedule still fits (``fits``: the caller's memory check), and stops when no
single change helps. Then it refines the best schedule seen, fixed ones included: it swaps two
neighbouring actions of one rank (a weight gradient earlier, a forward later, ...) wherever
the swap keeps the schedule valid, shortens the step and fits, until no swap helps or
``max_tries`` evaluations are spent. The fixed schedules the caller passes (``baselines``)
are evaluated under the same rules; the result is the best of everything seen, so it is
never worse than the best of them. A trial whose caps a recent replay says would replay the
same way (``listsched.Replayed.same_caps``) takes that replay's verdict without replaying
or evaluating it again (it still counts against ``max_tries``, so the search is the same).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from partitioner.schedule.ir import Schedule, ScheduleError, validate
from partitioner.schedule.listsched import Costs, replay, timed

__all__ = ["Synthesis", "synthesise"]

#: The kinds' orders the search tries (``listsched``): input gradients first, or forwards first.
PRIORITIES = ("IFW", "FIW")
#: How many of the latest replays a trial's caps are checked against before replaying them
#: (the climb's neighbours are of a caps vector replayed at most 2K trials before).
_RECENT = 48


@dataclass(frozen=True)
class Synthesis:
    """The best schedule found, its evaluated step, and the best baseline's for comparison."""

    schedule: Schedule
    step_ms: float
    tried: int  # schedules evaluated
    baseline: str | None = None  # name of the best fixed schedule that fits (None: none given)
    baseline_ms: float = float("inf")


def synthesise(costs: Costs, placement: Sequence[int], microbatches: int, *,
               evaluate: Callable[[Schedule], float] | None = None,
               fits: Callable[[Schedule], bool] | None = None,
               baselines: Sequence[Schedule] = (), max_tries: int = 400) -> Synthesis:
    """Search (see module docstring) for the schedule of K = ``costs.stages`` stages placed on
    ``placement``'s ranks with M micro-batches that minimises ``evaluate`` (default: the list
    scheduler's replay, ``listsched.timed``) among those ``fits`` accepts (default: all). Raises ValueError when
    nothing fits, naming the smallest memory the search tried."""
    big_k, m = costs.stages, microbatches
    seen: dict[tuple[str, tuple[int, ...]], float | None] = {}
    tried = 0
    best: tuple[float, Schedule] | None = None

    def score(sched: Schedule, own_ms: float | None) -> float | None:
        nonlocal tried, best
        tried += 1
        if fits is not None and not fits(sched):
            return None
        if evaluate is not None:
            step = evaluate(sched)
        else:
            step = timed(costs, sched) if own_ms is None else own_ms
        if best is None or step < best[0]:
            best = (step, sched)
        return step

    # the caps each recent replay stands for (``Replayed.same_caps``), with its score
    recent: dict[str, list[tuple[tuple[tuple[int, int], ...], float | None]]] = {}

    def trial(priority: str, caps: tuple[int, ...]) -> float | None:
        nonlocal tried
        key = (priority, caps)
        if key not in seen:
            for same, got in reversed(recent.get(priority, [])[-_RECENT:]):
                if all(lo <= c <= hi for c, (lo, hi) in zip(caps, same, strict=True)):
                    tried += 1  # the schedule of a replay done: counted, not replayed again
                    seen[key] = got
                    return got
            sched, own_ms, same = replay(costs, placement, m, caps, "synth", priority)
            seen[key] = score(sched, own_ms)
            recent.setdefault(priority, []).append((same, seen[key]))
        return seen[key]

    base_name, base_ms = None, float("inf")
    for sched in baselines:
        step = score(sched, None)
        if step is not None and step < base_ms:
            base_name, base_ms = sched.name, step
    for priority in PRIORITIES:
        for start in _starts(placement, big_k, m):
            caps = _shrink_to_fit(priority, start, trial)
            if caps is not None:
                _climb(priority, caps, m, trial, lambda: tried < max_tries)
    if best is not None:
        best = _refine(best, score, lambda: tried < max_tries)
    if best is None:
        raise ValueError(f"no schedule of K={big_k} stages and M={m} micro-batches fits, even "
                         f"with one micro-batch in flight per stage; allow more memory or use "
                         f"more stages")
    step, sched = best
    return Synthesis(sched, step, tried, base_name, base_ms)


def _starts(placement: Sequence[int], big_k: int, m: int) -> list[tuple[int, ...]]:
    """Caps of the known schedules: 1F1B's K-k, ZB-H1's K, a V shape's R, and M (GPipe's)."""
    ranks = max(placement) + 1
    starts = [tuple(min(m, big_k - k) for k in range(big_k)), (min(m, big_k),) * big_k,
              (min(m, ranks),) * big_k, (m,) * big_k]
    return list(dict.fromkeys(starts))


def _shrink_to_fit(priority: str, caps: tuple[int, ...],
                   trial: Callable[[str, tuple[int, ...]], float | None]) -> tuple[int, ...] | None:
    """``caps`` if they fit, else the caps clamped to the highest level c that fits,
    min(cap, c) on every stage (None: not even all ones fit), found by bisection over c:
    O(log M) trials, each a replay of the whole step (the climb that follows moves single
    caps). In the list scheduler's schedules memory grows with the caps as a rule, so the
    levels that fit are those up to one; where it does not, the result still fits, being a
    level that was tried, only perhaps not the highest."""
    if trial(priority, caps) is not None:
        return caps

    def clamped(c: int) -> tuple[int, ...]:
        return tuple(min(cap, c) for cap in caps)

    fits, fails = 1, max(caps)  # invariant: level ``fits`` fits, level ``fails`` does not
    if trial(priority, clamped(fits)) is None:
        return None
    while fails - fits > 1:
        mid = (fits + fails) // 2
        if trial(priority, clamped(mid)) is None:
            fails = mid
        else:
            fits = mid
    return clamped(fits)


def _climb(priority: str, caps: tuple[int, ...], m: int,
           trial: Callable[[str, tuple[int, ...]], float | None],
           budget: Callable[[], bool]) -> None:
    """First-improvement hill climbing over one stage's cap +-1."""
    current = trial(priority, caps)
    improved = current is not None
    while improved and budget():
        improved = False
        for k in range(len(caps)):
            for delta in (1, -1):
                c = caps[k] + delta
                if not 1 <= c <= m or not budget():
                    continue
                nxt = (*caps[:k], c, *caps[k + 1:])
                step = trial(priority, nxt)
                if step is not None and current is not None and step < current - 1e-12:
                    caps, current, improved = nxt, step, True


def _refine(best: tuple[float, Schedule],
            score: Callable[[Schedule, float | None], float | None],
            budget: Callable[[], bool]) -> tuple[float, Schedule]:
    """Swap neighbouring actions of one rank while that shortens the step (first improvement,
    sweeping every rank until a sweep changes nothing)."""
    step, sched = best
    improved = True
    while improved and budget():
        improved = False
        for r in range(sched.ranks):
            j = 0
            while j < len(sched.actions[r]) - 1 and budget():
                row = sched.actions[r]
                a, b = row[j], row[j + 1]
                j += 1
                if a.stage == b.stage and a.microbatch == b.microbatch:
                    continue  # F, I, W of one micro-batch keep their order
                swapped = (*row[:j - 1], b, a, *row[j + 1:])
                cand = Schedule("synth", sched.stages, sched.microbatches,
                                (*sched.actions[:r], swapped, *sched.actions[r + 1:]),
                                sched.placement)
                try:
                    validate(cand)
                except ScheduleError:
                    continue
                got = score(cand, None)
                if got is not None and got < step - 1e-12:
                    step, sched, improved = got, cand, True
    return step, sched
