"""Schedule generators: small pure functions of K, M (and V), one per schedule a plan can name.

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

Beyond the paper: ``one_f_one_b`` (same bubble, less memory), ``interleaved_1f1b`` (V stages
per rank, Narayanan et al. 2021: the bubble divided by V), ``zb_h1`` (split backward, Qi et al.
2024: a third of 1F1B's bubble at its memory) and ``zbv`` (two stages per rank in a V shape,
split backward, 1F1B's memory, almost no bubble). ``in_flight`` is the one rule for how many
micro-batches' activations a stage holds at once under each schedule; the cost model and the
memory checks call it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, get_args

from partitioner.schedule.ir import Action, Schedule
from partitioner.schedule.listsched import Costs, list_schedule

__all__ = [
    "MAX_MICROBATCHES",
    "SCHEDULES",
    "ScheduleName",
    "gpipe",
    "in_flight",
    "interleaved_1f1b",
    "make_schedule",
    "one_f_one_b",
    "peak_in_flight",
    "placed_like",
    "stages_per_rank_of",
    "v_placement",
    "zb_h1",
    "zbv",
]

ScheduleName = Literal["gpipe", "1f1b", "interleaved", "zb-h1", "zbv"]
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


def interleaved_1f1b(ranks: int, stages_per_rank: int, microbatches: int) -> Schedule:
    """Interleaved 1F1B (Megatron-LM's order): K = R x V stages, stage s on rank s mod R. Rank r
    runs its forwards in rounds of R micro-batches, each round through its stages in order
    (its backwards likewise, stages in reverse); it warms up with 2(R-r-1) + (V-1)R forwards
    (V = 1: R-r-1, which is 1F1B), then alternates one forward and one backward. With M a multiple of R and equal stages
    this takes M t + (R-1) t / V, t being a rank's F+B work per micro-batch. Any other M is
    scheduled as the next multiple of R with the missing micro-batches left out (deadlock
    free, since removing whole micro-batches from a schedule that runs leaves one that runs).

        >>> print(interleaved_1f1b(2, 2, 2))
        0: 0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1
        1: 1F0 1F1 3F0 3B0 3F1 3B1 1B0 1B1
    """
    big_r, v, m = ranks, stages_per_rank, microbatches
    _check_sizes(big_r * v, m)
    if big_r < 1 or v < 1:
        raise ValueError(f"interleaved 1F1B needs R >= 1 ranks and V >= 1 stages per rank, got "
                         f"R={big_r}, V={v}")
    padded = -(-m // big_r) * big_r

    def order(kind: Literal["F", "B"], r: int) -> list[Action]:
        chunks = range(v) if kind == "F" else range(v - 1, -1, -1)
        return [Action(kind, c * big_r + r, i) for g in range(0, padded, big_r)
                for c in chunks for i in range(g, g + big_r)]

    rows = []
    for r in range(big_r):
        fwd, bwd, total = order("F", r), order("B", r), padded * v
        warm = min(2 * (big_r - r - 1) + (v - 1) * big_r if v > 1 else big_r - r - 1, total)
        row = fwd[:warm]
        for j in range(total - warm):
            row += [fwd[warm + j], bwd[j]]
        row += bwd[total - warm:]
        rows.append(tuple(a for a in row if a.microbatch < m))
    placement = tuple(s % big_r for s in range(big_r * v)) if v > 1 else ()
    return Schedule("interleaved", big_r * v, m, tuple(rows), placement)


def zb_h1(stages: int, microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al., ICLR 2024, section 3.1): 1F1B with each backward split into I and W.
    Stage k warms up with K-k forwards, then runs I, W, F per micro-batch; the weight
    gradients of the last K micro-batches wait, each filling the place of a forward that is
    no longer there, so the input gradients of the drain travel up the pipeline unhindered.
    With F = I = W = u on every stage and M >= K it takes 3Mu + (K-1)u (1F1B: 3(M+K-1)u),
    never holding more than K micro-batches (F to W) on a stage.

        >>> print(zb_h1(2, 2))
        0: 0F0 0F1 0I0 0W0 0I1 0W1
        1: 1F0 1I0 1F1 1I1 1W0 1W1
    """
    _check_sizes(stages, microbatches)
    big_k, m = stages, microbatches
    rows = []
    for k in range(big_k):
        warm = min(big_k - k, m)
        row = [Action("F", k, i) for i in range(warm)]
        forwards, waiting = warm, []
        for j in range(m):
            row.append(Action("I", k, j))
            if j < m - big_k:
                row.append(Action("W", k, j))
            else:
                waiting.append(Action("W", k, j))
            if forwards < m:
                row.append(Action("F", k, forwards))
                forwards += 1
            elif j >= m - big_k:
                row.append(waiting.pop(0))
        rows.append(tuple(row + waiting))
    return Schedule("zb-h1", big_k, m, tuple(rows))


def v_placement(ranks: int) -> tuple[int, ...]:
    """The V shape: rank r holds stages r and 2R-1-r (the first and the last stage share rank
    0), so the activations turn around on rank R-1 without leaving it.

        >>> v_placement(3)
        (0, 1, 2, 2, 1, 0)
    """
    return tuple(k if k < ranks else 2 * ranks - 1 - k for k in range(2 * ranks))


def zbv(ranks: int, microbatches: int) -> Schedule:
    """ZB-V (Qi et al., section 6): K = 2R stages in the V shape, backward split into I and W,
    at most R micro-batches in flight per stage (2R per rank: 1F1B's peak in a rank's share
    of the model). The order is the list scheduler's (``listsched``) for equal unit times,
    forwards first (deeper stage first), then input gradients, weight gradients to fill. With
    F = I = W = u per stage and M a multiple of R it takes 6Mu + (R-1)u: half ZB-H1's bubble
    on the same R ranks (6Mu + 2(R-1)u), and a sixth of 1F1B's.

        >>> print(zbv(1, 2))
        0: 0F0 1F0 1I0 0I0 0W0 0F1 1W0 1F1 1I1 0I1 0W1 1W1
    """
    _check_sizes(2 * ranks, microbatches)
    sched = list_schedule(Costs.uniform(2 * ranks), v_placement(ranks), microbatches,
                          (ranks,) * (2 * ranks), "zbv", priority="FIW")
    return sched


def placed_like(sched: Schedule) -> str:
    """The fixed schedule with ``sched``'s placement and backward (what a cost model of a
    synthesised schedule is built for: memory and durations follow the schedule's own
    actions, the name only fixes K, V and whether the backward splits).

        >>> placed_like(zb_h1(3, 4)), placed_like(zbv(2, 4)), placed_like(one_f_one_b(3, 4))
        ('zb-h1', 'zbv', '1f1b')
    """
    if not sched.placement:
        return "zb-h1" if sched.split else "1f1b"
    if sched.stages % 2 == 0 and sched.placement == v_placement(sched.stages // 2):
        return "zbv"
    return "interleaved"


def stages_per_rank_of(name: str, stages: int, stages_per_rank: int) -> int:
    """Check that schedule ``name`` can put K stages V per rank, and return V."""
    v = stages_per_rank
    allowed = {"interleaved": None, "zbv": 2}.get(name, 1)
    problem = None
    if name not in _GENERATORS:
        problem = f"schedule {name!r} is unknown; use one of {', '.join(SCHEDULES)}"
    elif v < 1 or stages % v:
        problem = f"K={stages} stages cannot go V={v} per rank; V must divide K"
    elif allowed is not None and v != allowed:
        problem = (f"schedule {name!r} runs {allowed} stage(s) per rank, not V={v}; "
                   + ("use --stages-per-rank 2" if allowed == 2 else "use V=1, or 'interleaved' "
                      "or 'zbv' for several stages per rank"))
    if problem:
        raise ValueError(problem)
    return v


@lru_cache(maxsize=8)  # schedules are immutable; a search asks for each twice in a row
def make_schedule(name: str, stages: int, microbatches: int,
                  stages_per_rank: int = 1) -> Schedule:
    """The schedule a plan names, for K stages, M micro-batches, V stages per rank (V > 1 only
    for ``interleaved``; ``zbv`` always has V = 2)."""
    if name == "zbv" and stages_per_rank == 1:
        stages_per_rank = 2
    v = stages_per_rank_of(name, stages, stages_per_rank)
    if name == "interleaved":
        return interleaved_1f1b(stages // v, v, microbatches)
    if name == "zbv":
        return zbv(stages // 2, microbatches)
    return _GENERATORS[name](stages, microbatches)


_GENERATORS = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": one_f_one_b,
               "zb-h1": zb_h1, "zbv": zb_h1}  # the names; V > 1 goes through make_schedule
assert tuple(_GENERATORS) == SCHEDULES


def _check_sizes(stages: int, microbatches: int) -> None:
    if stages < 1 or not 1 <= microbatches <= MAX_MICROBATCHES:
        raise ValueError(f"a schedule needs K >= 1 stages and 1 <= M <= {MAX_MICROBATCHES} "
                         f"micro-batches, got K={stages}, M={microbatches}")



def peak_in_flight(sched: Schedule) -> tuple[int, ...]:
    """Per stage, the most micro-batches whose activations it holds at once in ``sched``: from
    F until B, or until W when the backward is split (what W needs stays until W runs).

        >>> peak_in_flight(one_f_one_b(3, 8)), peak_in_flight(zb_h1(3, 8))
        ((3, 2, 1), (3, 3, 3))
    """
    live, peak = [0] * sched.stages, [0] * sched.stages
    for row in sched.actions:
        for a in row:
            if a.kind == "F":
                live[a.stage] += 1
                peak[a.stage] = max(peak[a.stage], live[a.stage])
            elif a.kind in ("B", "W"):
                live[a.stage] -= 1
    return tuple(peak)


def counting_microbatches(schedule: str, stages: int, microbatches: int,
                          stages_per_rank: int = 1) -> int:
    """The M whose schedule holds, on every stage, exactly what schedule ``schedule`` holds
    with ``microbatches``: M itself, or min(M, 2R) for interleaved and ZB-V on R ranks. Why:
    past their warm-up both repeat with a period of R micro-batches (interleaved: each group
    of R runs F and B for every chunk in the same order; ZB-V: the list scheduler's unit-time
    order settles into one), each period running R forwards and R backward passes per stage,
    so a stage's counts go through the same values every period, and the drain is the same
    sequence shifted: the counts depend on M only through the warm-up and the remainder M mod
    R of a partial last group. That the remainder does not matter either from M = 2R on is
    observed, not derived: tested against the replay of the whole schedule at every M from
    2R + 1 to 6RV + 12 (R = 2, 3, 5; V = 2, 3, 4) and at K = 32, 40, 64, and checked once for every
    K = R x V <= 64 (V = 2, 4) at M = 2R + 1, 3R +- 1, 5R - 1 and every power of two up to
    512 (409 cases). It makes counting K=64 stages at M=512 a replay of M=64.

        >>> counting_microbatches("interleaved", 8, 512, 2), counting_microbatches("1f1b", 8, 512)
        (8, 512)
    """
    if schedule not in ("interleaved", "zbv"):
        return microbatches
    ranks = stages // (2 if schedule == "zbv" else stages_per_rank)
    return min(microbatches, 2 * ranks)


@lru_cache(maxsize=4096)
def _replayed(schedule: str, stages: int, microbatches: int,
              stages_per_rank: int) -> tuple[int, ...]:
    m = counting_microbatches(schedule, stages, microbatches, stages_per_rank)
    return peak_in_flight(make_schedule(schedule, stages, m, stages_per_rank))


def in_flight(schedule: str, stage: int, stages: int, microbatches: int,
              stages_per_rank: int = 1) -> int:
    """Micro-batches whose activations stage k holds at once: M under GPipe (all forwards
    first), min(K-k, M) under 1F1B (warm-up forwards, then one backward per forward); for the
    other schedules, what their generator's schedule holds (``peak_in_flight``).

        >>> in_flight("gpipe", 0, 4, 8), in_flight("1f1b", 0, 4, 8), in_flight("1f1b", 3, 4, 8)
        (8, 4, 1)
        >>> in_flight("zb-h1", 3, 4, 8), in_flight("interleaved", 0, 4, 8, stages_per_rank=2)
        (4, 4)
    """
    if schedule not in _GENERATORS:
        raise ValueError(f"schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if schedule == "1f1b":
        return min(stages - stage, microbatches)
    if schedule == "gpipe":
        return microbatches
    return _replayed(schedule, stages, microbatches, stages_per_rank)[stage]
