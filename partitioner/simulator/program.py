"""A schedule as the simulator's event loop reads it: per rank, compute steps with their messages.

    >>> from partitioner.schedule.generators import zb_h1
    >>> ops = rank_programs(zb_h1(2, 1))
    >>> [(KINDS[recv], KINDS[work], KINDS[send], k, i) for recv, work, send, k, i, _ in ops[0]]
    [('', 'F', 'SF', 0, 0), ('RB', 'I', '', 0, 0), ('', 'W', '', 0, 0)]

One ``Op`` per compute action: (receive, compute, send, stage, micro-batch, the Action), with
the receive ``lower`` places just before the compute and the send it places just after (RF, F,
SF; RB, B or I, SB; W alone), so that the event loop turns once per compute action; codes are
0 where there is none. A lowered schedule keeps its own receives and sends (a receive or send
that does not bracket its compute is a step of its own, with compute code 0).
"""

from __future__ import annotations

from collections import OrderedDict

from partitioner.schedule.ir import Action, Schedule, ScheduleError, validate

__all__ = ["BWD", "CODE", "FWD", "INPUT", "KINDS", "RB", "RF", "SB", "SF", "WEIGHT", "Op",
           "rank_programs"]

RF, FWD, SF, RB, BWD, SB, INPUT, WEIGHT = range(1, 9)  # 0: nothing
CODE = {"RF": RF, "F": FWD, "SF": SF, "RB": RB, "B": BWD, "SB": SB, "I": INPUT, "W": WEIGHT}
KINDS = ("", "RF", "F", "SF", "RB", "B", "SB", "I", "W")
Op = tuple[int, int, int, int, int, "Action | None"]
_OPENS = {FWD: RF, BWD: RB, INPUT: RB}  # the receive that brackets each compute (``lower``)
_CLOSES = {FWD: SF, BWD: SB, INPUT: SB}  # and its send

# micro-batch progress on a stage while checking a plain schedule
_NEW, _FWD, _DONE, _INPUT = range(4)


#: The programs of the latest schedules lowered, by identity (each kept alive by its entry,
#: so its id is not reused): a search simulates one named schedule on many partitions.
_RECENT: OrderedDict[int, tuple[Schedule, list[list[Op]]]] = OrderedDict()
_RECENT_MAX = 16


def rank_programs(sched: Schedule) -> list[list[Op]]:
    """Per rank, the schedule's actions as ``Op`` steps, made once for the latest schedules
    (``_RECENT``; the event loop only reads them); see ``_lower``."""
    got = _RECENT.get(id(sched))
    if got is not None and got[0] is sched:
        _RECENT.move_to_end(id(sched))
        return got[1]
    programs = _lower(sched)
    _RECENT[id(sched)] = (sched, programs)
    if len(_RECENT) > _RECENT_MAX:
        _RECENT.popitem(last=False)
    return programs


def _lower(sched: Schedule) -> list[list[Op]]:
    """Per rank, the schedule's actions as ``Op`` steps. A plain schedule gets the receives
    and sends that ``lower`` would add, and is checked here in one cheap pass (each
    micro-batch's F once, then its B once or its I then its W, on the right stage and rank); a
    lowered one is validated in full. Anything wrong is reported by ``validate``, with the
    grid."""
    if sched.is_lowered:
        validate(sched)
        return [_fold([(CODE[a.kind], a) for a in row]) for row in sched.actions]
    big_k, m = sched.stages, sched.microbatches
    last = big_k - 1
    rank_of = sched.rank_of
    if len(rank_of) != big_k or sched.ranks != max(rank_of, default=-1) + 1:
        _invalid(sched)
    state = [[_NEW] * m for _ in range(big_k)]
    out = []
    for r, row in enumerate(sched.actions):
        ops: list[Op] = []
        mine = {k for k in range(big_k) if rank_of[k] == r}
        for a in row:
            k, i, kind = a.stage, a.microbatch, a.kind
            if k not in mine or not 0 <= i < m:
                _invalid(sched)
            progress = state[k]
            if kind == "F":
                if progress[i] != _NEW:
                    _invalid(sched)
                progress[i] = _FWD
                ops.append((RF if k > 0 else 0, FWD, SF if k < last else 0, k, i, a))
            elif kind == "W":
                if progress[i] != _INPUT:
                    _invalid(sched)
                progress[i] = _DONE
                ops.append((0, WEIGHT, 0, k, i, a))
            else:  # B or I
                if progress[i] != _FWD:
                    _invalid(sched)
                progress[i] = _DONE if kind == "B" else _INPUT
                ops.append((RB if k < last else 0, BWD if kind == "B" else INPUT,
                            SB if k > 0 else 0, k, i, a))
        out.append(ops)
    if any(x != _DONE for row in state for x in row):
        _invalid(sched)
    return out


def _invalid(sched: Schedule) -> None:
    """Raise ``validate``'s error, which names the problem and shows the grid."""
    validate(sched)
    raise ScheduleError(f"schedule {sched.name!r} cannot be simulated: an action is on the wrong "
                        f"rank or out of order (validate found nothing more precise)")


def _fold(row: list[tuple[int, Action]]) -> list[Op]:
    """Attach each receive to the compute right after it and each send to the compute right
    before it (same stage and micro-batch, as ``lower`` brackets them); others stay steps of
    their own."""
    ops: list[Op] = []
    j = 0
    while j < len(row):
        code, a = row[j]
        recv = 0
        if code in (RF, RB) and j + 1 < len(row) and _opens(code, a, *row[j + 1]):
            recv, (code, a) = code, row[j + 1]
            j += 1
        where = (a.stage, a.microbatch)
        if code in _CLOSES and j + 1 < len(row) and row[j + 1][0] == _CLOSES[code] and \
                (row[j + 1][1].stage, row[j + 1][1].microbatch) == where:
            ops.append((recv, code, _CLOSES[code], *where, a))
            j += 2
        elif code in (FWD, BWD, INPUT, WEIGHT):
            ops.append((recv, code, 0, *where, a))
            j += 1
        else:
            ops.append((code, 0, 0, *where, None) if code in (RF, RB) else
                       (0, 0, code, *where, None))
            j += 1
    return ops


def _opens(recv: int, got: Action, code: int, a: Action) -> bool:
    """Whether receive ``recv`` of action ``got`` brackets the compute (``code``, ``a``)."""
    return _OPENS.get(code) == recv and (a.stage, a.microbatch) == (got.stage, got.microbatch)
