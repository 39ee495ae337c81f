"""The schedule IR: one ordered list of actions per rank, shared by simulator and executor.

    >>> sched = Schedule.parse("0: 0F0 0F1 0B1 0B0\\n1: 1F0 1B0 1F1 1B1")
    >>> print(validate(sched).grid())
    t  stage0  stage1
    0  0F0
    1  0F1     1F0
    2          1B0
    3          1F1
    4          1B1
    5  0B1
    6  0B0

An action's text is ``{stage}{kind}{microbatch}``: ``1F3`` is the forward of micro-batch 3 on
stage 1. Kinds: F, B (compute); I and W, the two halves of a split backward (I: the input
gradient, sent upstream at once; W: the weight gradient, which may wait; B = I + W); and,
after ``lower``, SF/RF (send/receive the activation forward) and SB/RB (send/receive its
gradient backward). Sends are asynchronous (a sender never waits for its receiver); receives
block until the matching send has happened.

Each row of a schedule is the program of one *rank*, in the order the rank runs it. A rank
usually runs one stage (rank k runs stage k); with several stages per rank (interleaved or
V-shaped placement, ``placement[k]`` = the rank of stage k) a row interleaves the actions of
its stages. The generators of the named schedules are in ``schedule.generators``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

__all__ = [
    "COMPUTE",
    "Action",
    "Schedule",
    "ScheduleError",
    "lower",
    "validate",
]

Kind = Literal["F", "B", "I", "W", "SF", "RF", "SB", "RB"]
COMPUTE: tuple[Kind, ...] = ("F", "B", "I", "W")
_TEXT = re.compile(r"^(\d+)(F|B|I|W|SF|RF|SB|RB)(\d+)$")


class ScheduleError(ValueError):
    """A schedule that cannot run as written; the message names stage and step and shows it."""


@dataclass(frozen=True, order=True)
class Action:
    """One step of one stage: ``Action("F", 1, 3)`` prints and parses as ``1F3``."""

    kind: Kind
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @staticmethod
    def parse(text: str) -> Action:
        """``Action.parse("1F3") == Action("F", 1, 3)``."""
        m = _TEXT.match(text.strip())
        if m is None:
            raise ValueError(f"action {text!r} is not of the form {{stage}}{{kind}}{{microbatch}} "
                             f"with kind F, B, I, W, SF, RF, SB or RB, e.g. '1F3'")
        return Action(m.group(2), int(m.group(1)), int(m.group(3)))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists for K stages and M micro-batches; ``name`` says which generator;
    ``placement[k]`` is the rank of stage k (empty: rank k runs stage k alone)."""

    name: str
    stages: int
    microbatches: int
    actions: tuple[tuple[Action, ...], ...]  # actions[r]: rank r's actions, in order
    placement: tuple[int, ...] = ()

    def __str__(self) -> str:
        """One line per rank, e.g. ``0: 0F0 0F1 0B1 0B0``."""
        return "\n".join(f"{r}: " + " ".join(map(str, acts)) for r, acts in
                         enumerate(self.actions))

    @staticmethod
    def parse(text: str, name: str = "custom") -> Schedule:
        """Inverse of ``str(schedule)``: the placement is read off the rows (a stage runs on the
        rank whose row holds its actions)."""
        rows = []
        for line in text.strip().splitlines():
            _, _, body = line.partition(":")
            rows.append(tuple(Action.parse(tok) for tok in body.split()))
        mbs = {a.microbatch for row in rows for a in row}
        rank_of: dict[int, int] = {}
        for r, row in enumerate(rows):
            for a in row:
                if rank_of.setdefault(a.stage, r) != r:
                    raise ValueError(f"stage {a.stage} has actions on rows {rank_of[a.stage]} "
                                     f"and {r}; each stage runs on one rank (one row)")
        big_k = max(rank_of) + 1 if rank_of else len(rows)
        missing = sorted(set(range(big_k)) - set(rank_of))
        if missing:
            raise ValueError(f"stages {missing} have no action in any row; every stage of "
                             f"0..{big_k - 1} needs its actions on one rank")
        placement = tuple(rank_of[k] for k in range(big_k))
        if placement == tuple(range(len(rows))):
            placement = ()
        return Schedule(name, big_k, max(mbs) + 1 if mbs else 0, tuple(rows), placement)

    @property
    def ranks(self) -> int:
        """R: how many ranks (rows) run the schedule."""
        return len(self.actions)

    @cached_property
    def rank_of(self) -> tuple[int, ...]:
        """The rank of each stage (``placement``, or stage k on rank k)."""
        return self.placement or tuple(range(self.stages))

    @cached_property  # asked once per action by clock() and validate(): compute it once
    def is_lowered(self) -> bool:
        return any(a.kind not in COMPUTE for row in self.actions for a in row)

    @cached_property
    def split(self) -> frozenset[tuple[int, int]]:
        """The (stage, micro-batch) pairs whose backward is split into I and W."""
        return frozenset((a.stage, a.microbatch) for row in self.actions for a in row
                         if a.kind == "I")

    def grad_action(self, stage: int, microbatch: int) -> Action:
        """The action that computes the input gradient of ``microbatch`` on ``stage``: I when
        its backward is split, else B."""
        kind: Kind = "I" if (stage, microbatch) in self.split else "B"
        return Action(kind, stage, microbatch)

    def clock(self) -> list[list[Action | None]] | None:
        """Unit-time replay: row t holds what each rank runs at clock t (None: idle). A rank
        runs its next action once the actions it depends on ran at earlier clocks. None if the
        schedule cannot finish (a deadlock)."""
        done: set[Action] = set()
        pos = [0] * self.ranks
        rows: list[list[Action | None]] = []
        total = sum(len(r) for r in self.actions)
        while len(done) < total:
            row: list[Action | None] = [None] * self.ranks
            for r, acts in enumerate(self.actions):
                if pos[r] < len(acts) and all(d in done for d in _needs(acts[pos[r]], self)):
                    row[r] = acts[pos[r]]
            if not any(row):
                return None
            for r, a in enumerate(row):
                if a is not None:
                    done.add(a)
                    pos[r] += 1
            rows.append(row)
        return rows

    def grid(self) -> str:
        """The step x rank table (columns ``stage{k}`` when each rank runs one stage): by clock
        when the schedule can run, else by list position."""
        rows = self.clock()
        label = "t"
        if rows is None:
            label = "step"
            depth = max((len(r) for r in self.actions), default=0)
            rows = [[r[i] if i < len(r) else None for r in self.actions] for i in range(depth)]
        column = "rank" if self.placement else "stage"
        headers = [label] + [f"{column}{r}" for r in range(self.ranks)]
        cells = [[str(t)] + ["" if a is None else str(a) for a in row]
                 for t, row in enumerate(rows)]
        widths = [max(len(c[i]) for c in [headers, *cells]) for i in range(len(headers))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                         for line in [headers, *cells])


def _needs(a: Action, sched: Schedule) -> list[Action]:
    """The actions of other stages that must have run before ``a`` (see module docstring);
    what a stage needs of itself (F before B) is its row's order."""
    k, i, last = a.stage, a.microbatch, sched.stages - 1
    if sched.is_lowered:
        if a.kind == "RF":
            return [Action("SF", k - 1, i)]
        if a.kind == "RB":
            return [Action("SB", k + 1, i)]
        return []
    if a.kind == "F" and k > 0:
        return [Action("F", k - 1, i)]
    if a.kind in ("B", "I") and k < last:
        return [sched.grad_action(k + 1, i)]
    return []


def lower(sched: Schedule) -> Schedule:
    """Add the communication: RF before and SF after each forward (except at the ends of the
    pipeline), RB before and SB after each backward or input gradient (I); W sends nothing."""
    if sched.is_lowered:
        raise ValueError(f"schedule {sched.name!r} is already lowered")
    last = sched.stages - 1
    rows = []
    for acts in sched.actions:
        row: list[Action] = []
        for a in acts:
            k, i = a.stage, a.microbatch
            if a.kind == "F":
                row += ([Action("RF", k, i)] if k > 0 else []) + [a]
                row += [Action("SF", k, i)] if k < last else []
            elif a.kind == "W":
                row.append(a)
            else:
                row += ([Action("RB", k, i)] if k < last else []) + [a]
                row += [Action("SB", k, i)] if k > 0 else []
        rows.append(tuple(row))
    return Schedule(sched.name, sched.stages, sched.microbatches, tuple(rows), sched.placement)


# -- validation -----------------------------------------------------------------------------------

def _placement_problems(sched: Schedule) -> list[str]:
    """The placement: one rank per stage, every rank some stage, every action on its rank."""
    problems = []
    if sched.placement:
        if len(sched.placement) != sched.stages:
            return [f"placement {list(sched.placement)} names {len(sched.placement)} ranks for "
                    f"K={sched.stages} stages; give the rank of every stage"]
        idle = sorted(set(range(sched.ranks)) - set(sched.placement))
        bad = sorted({r for r in sched.placement if not 0 <= r < sched.ranks})
        if bad:
            problems.append(f"placement names ranks {bad} but the schedule has rows for ranks "
                            f"0..{sched.ranks - 1}")
        if idle:
            problems.append(f"ranks {idle} run no stage; drop their rows or place a stage there")
    elif sched.ranks != sched.stages:
        problems.append(f"{sched.ranks} rank lists for K={sched.stages} stages without a "
                        f"placement; give one list per stage, or the rank of each stage")
    rank_of = sched.rank_of
    for r, acts in enumerate(sched.actions):
        for step, a in enumerate(acts):
            if not 0 <= a.stage < sched.stages:
                problems.append(f"rank {r}, step {step} ({a}): stage {a.stage} is outside "
                                f"0..{sched.stages - 1}")
            elif rank_of[a.stage] != r:
                problems.append(f"rank {r}, step {step} ({a}): stage {a.stage} runs on rank "
                                f"{rank_of[a.stage]}")
    return problems


def _order_problems(sched: Schedule) -> list[str]:
    """Per-stage checks: each micro-batch's F once, then either B once or I then W once each,
    and in a lowered schedule each compute action bracketed by its receive and send."""
    problems: list[str] = []
    last = sched.stages - 1
    seen: list[dict[Action, int]] = [{} for _ in range(sched.stages)]
    for r, acts in enumerate(sched.actions):
        for step, a in enumerate(acts):
            if not 0 <= a.stage < sched.stages:
                continue
            k, i = a.stage, a.microbatch
            where = f"stage {k}, step {step} ({a})" if not sched.placement else \
                f"rank {r}, step {step} ({a})"
            if not 0 <= i < sched.microbatches:
                problems.append(f"{where}: micro-batch {i} is outside "
                                f"0..{sched.microbatches - 1}")
            if a in seen[k]:
                problems.append(f"{where}: repeats step {seen[k][a]}")
            seen[k].setdefault(a, step)
            first = {"B": "F", "I": "F", "W": "I"}.get(a.kind)
            if first is not None and Action(first, k, i) not in seen[k]:  # type: ignore[arg-type]
                what = "weight gradient before the input gradient" if a.kind == "W" else \
                    "backward before the forward"
                problems.append(f"{where}: {what} of micro-batch {i}")
    for k in range(sched.stages):
        got = seen[k]
        expected = {Action("F", k, i) for i in range(sched.microbatches)}
        for i in range(sched.microbatches):
            split = Action("I", k, i) in got or Action("W", k, i) in got
            if split and Action("B", k, i) in got:
                problems.append(f"stage {k}: micro-batch {i} has both B and I/W; run either "
                                f"the full backward B or its halves I and W")
            expected |= {Action("I", k, i), Action("W", k, i)} if split else {Action("B", k, i)}
        if sched.is_lowered:
            comm: tuple[tuple[Kind, bool], ...] = (
                ("RF", k > 0), ("SF", k < last), ("RB", k < last), ("SB", k > 0))
            expected |= {Action(kind, k, i) for i in range(sched.microbatches)
                         for kind, ok in comm if ok}
        for a in sorted(expected - set(got)):
            problems.append(f"stage {k}: {a} is missing")
        for a in sorted(set(got) - expected):
            if 0 <= a.microbatch < sched.microbatches:
                problems.append(f"stage {k}, step {got[a]} ({a}): not expected on this stage")
        if sched.is_lowered:
            problems += _bracket_problems(k, got)
    return problems


def _bracket_problems(k: int, seen: dict[Action, int]) -> list[str]:
    problems = []
    for a, step in seen.items():
        pairs = {"F": ("RF", "SF"), "B": ("RB", "SB"), "I": ("RB", "SB")}.get(a.kind)
        if pairs is None:
            continue
        before, after = (Action(kind, k, a.microbatch) for kind in pairs)  # type: ignore[arg-type]
        if before in seen and seen[before] > step:
            problems.append(f"stage {k}, step {step} ({a}): runs before its receive {before}")
        if after in seen and seen[after] < step:
            problems.append(f"stage {k}, step {step} ({a}): its send {after} comes first")
    return problems


def validate(sched: Schedule) -> Schedule:
    """Check the placement, counts, per-stage order (F before B; F before I before W),
    send/receive matching and that the whole schedule can run without a deadlock; raise one
    ScheduleError naming each problem, with the grid."""
    problems = _placement_problems(sched)
    if not problems:
        problems = _order_problems(sched)
    if not problems and sched.clock() is None:
        problems.append(_deadlock(sched))
    if problems:
        raise ScheduleError(
            f"schedule {sched.name!r} (K={sched.stages}, M={sched.microbatches}) cannot run:\n  "
            + "\n  ".join(problems) + "\n" + sched.grid())
    return sched


def _deadlock(sched: Schedule) -> str:
    """Name the first action of each stuck rank and what it waits for."""
    done: set[Action] = set()
    pos = [0] * sched.ranks
    progress = True
    while progress:
        progress = False
        for r, acts in enumerate(sched.actions):
            while pos[r] < len(acts) and all(d in done for d in _needs(acts[pos[r]], sched)):
                done.add(acts[pos[r]])
                pos[r] += 1
                progress = True
    who = "rank" if sched.placement else "stage"
    stuck = [f"{who} {r} at step {pos[r]} ({acts[pos[r]]}) waits for "
             + ", ".join(map(str, _needs(acts[pos[r]], sched)))
             for r, acts in enumerate(sched.actions) if pos[r] < len(acts)]
    return "deadlock: " + "; ".join(stuck)
