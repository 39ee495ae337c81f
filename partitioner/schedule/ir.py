"""The schedule IR: one ordered list of actions per stage, shared by simulator and executor.

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
stage 1. Kinds: F, B (compute) and, after ``lower``, SF/RF (send/receive the activation
forward) and SB/RB (send/receive its gradient backward). Sends are asynchronous (a sender
never waits for its receiver); receives block until the matching send has happened. The
generators of the named schedules are in ``schedule.generators``.
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

Kind = Literal["F", "B", "SF", "RF", "SB", "RB"]
COMPUTE: tuple[Kind, ...] = ("F", "B")
_TEXT = re.compile(r"^(\d+)(F|B|SF|RF|SB|RB)(\d+)$")


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
                             f"with kind F, B, SF, RF, SB or RB, e.g. '1F3'")
        return Action(m.group(2), int(m.group(1)), int(m.group(3)))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Schedule:
    """Per-stage action lists for K stages and M micro-batches; ``name`` says which generator."""

    name: str
    stages: int
    microbatches: int
    actions: tuple[tuple[Action, ...], ...]  # actions[k]: stage k's actions, in order

    def __str__(self) -> str:
        """One line per stage, e.g. ``0: 0F0 0F1 0B1 0B0``."""
        return "\n".join(f"{k}: " + " ".join(map(str, acts)) for k, acts in
                         enumerate(self.actions))

    @staticmethod
    def parse(text: str, name: str = "custom") -> Schedule:
        """Inverse of ``str(schedule)``."""
        rows = []
        for line in text.strip().splitlines():
            _, _, body = line.partition(":")
            rows.append(tuple(Action.parse(tok) for tok in body.split()))
        mbs = {a.microbatch for row in rows for a in row}
        return Schedule(name, len(rows), max(mbs) + 1 if mbs else 0, tuple(rows))

    @cached_property  # asked once per action by clock() and validate(): compute it once
    def is_lowered(self) -> bool:
        return any(a.kind not in COMPUTE for row in self.actions for a in row)

    def clock(self) -> list[list[Action | None]] | None:
        """Unit-time replay: row t holds what each stage runs at clock t (None: idle). A stage
        runs its next action once the actions it depends on ran at earlier clocks. None if the
        schedule cannot finish (a deadlock)."""
        done: set[Action] = set()
        pos = [0] * self.stages
        rows: list[list[Action | None]] = []
        total = sum(len(r) for r in self.actions)
        while len(done) < total:
            row: list[Action | None] = [None] * self.stages
            for k, acts in enumerate(self.actions):
                if pos[k] < len(acts) and all(d in done for d in _needs(acts[pos[k]], self)):
                    row[k] = acts[pos[k]]
            if not any(row):
                return None
            for k, a in enumerate(row):
                if a is not None:
                    done.add(a)
                    pos[k] += 1
            rows.append(row)
        return rows

    def grid(self) -> str:
        """The step x stage table: by clock when the schedule can run, else by list position."""
        rows = self.clock()
        label = "t"
        if rows is None:
            label = "step"
            depth = max((len(r) for r in self.actions), default=0)
            rows = [[r[i] if i < len(r) else None for r in self.actions] for i in range(depth)]
        headers = [label] + [f"stage{k}" for k in range(self.stages)]
        cells = [[str(t)] + ["" if a is None else str(a) for a in row]
                 for t, row in enumerate(rows)]
        widths = [max(len(c[i]) for c in [headers, *cells]) for i in range(len(headers))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                         for line in [headers, *cells])


def _needs(a: Action, sched: Schedule) -> list[Action]:
    """The actions of other stages that must have run before ``a`` (see module docstring)."""
    k, i, last = a.stage, a.microbatch, sched.stages - 1
    if sched.is_lowered:
        if a.kind == "RF":
            return [Action("SF", k - 1, i)]
        if a.kind == "RB":
            return [Action("SB", k + 1, i)]
        return []
    if a.kind == "F" and k > 0:
        return [Action("F", k - 1, i)]
    if a.kind == "B" and k < last:
        return [Action("B", k + 1, i)]
    return []



def lower(sched: Schedule) -> Schedule:
    """Add the communication: RF before and SF after each forward (except at the ends of the
    pipeline), RB before and SB after each backward."""
    if sched.is_lowered:
        raise ValueError(f"schedule {sched.name!r} is already lowered")
    last = sched.stages - 1
    rows = []
    for k, acts in enumerate(sched.actions):
        row: list[Action] = []
        for a in acts:
            i = a.microbatch
            if a.kind == "F":
                row += ([Action("RF", k, i)] if k > 0 else []) + [a]
                row += [Action("SF", k, i)] if k < last else []
            else:
                row += ([Action("RB", k, i)] if k < last else []) + [a]
                row += [Action("SB", k, i)] if k > 0 else []
        rows.append(tuple(row))
    return Schedule(sched.name, sched.stages, sched.microbatches, tuple(rows))


# -- validation -----------------------------------------------------------------------------------

def _order_problems(sched: Schedule) -> list[str]:
    """Per-stage checks: right stage, each micro-batch's F once and B once, F before B, and in
    a lowered schedule each compute action bracketed by its receive and send."""
    problems: list[str] = []
    last = sched.stages - 1
    for k, acts in enumerate(sched.actions):
        seen: dict[Action, int] = {}
        for step, a in enumerate(acts):
            where = f"stage {k}, step {step} ({a})"
            if a.stage != k:
                problems.append(f"{where}: belongs to stage {a.stage}")
            if not 0 <= a.microbatch < sched.microbatches:
                problems.append(f"{where}: micro-batch {a.microbatch} is outside "
                                f"0..{sched.microbatches - 1}")
            if a in seen:
                problems.append(f"{where}: repeats step {seen[a]}")
            seen.setdefault(a, step)
            if a.kind == "B" and Action("F", k, a.microbatch) not in seen:
                problems.append(f"{where}: backward before the forward of micro-batch "
                                f"{a.microbatch}")
        expected = {Action(kind, k, i) for kind in COMPUTE for i in range(sched.microbatches)}
        if sched.is_lowered:
            comm: tuple[tuple[Kind, bool], ...] = (
                ("RF", k > 0), ("SF", k < last), ("RB", k < last), ("SB", k > 0))
            expected |= {Action(kind, k, i) for i in range(sched.microbatches)
                         for kind, ok in comm if ok}
        for a in sorted(expected - set(seen)):
            problems.append(f"stage {k}: {a} is missing")
        for a in sorted(set(seen) - expected):
            if a.stage == k and 0 <= a.microbatch < sched.microbatches:
                problems.append(f"stage {k}, step {seen[a]} ({a}): not expected on this stage")
        if sched.is_lowered:
            problems += _bracket_problems(k, seen)
    return problems


def _bracket_problems(k: int, seen: dict[Action, int]) -> list[str]:
    problems = []
    for a, step in seen.items():
        pairs = {"F": ("RF", "SF"), "B": ("RB", "SB")}.get(a.kind)
        if pairs is None:
            continue
        before, after = (Action(kind, k, a.microbatch) for kind in pairs)  # type: ignore[arg-type]
        if before in seen and seen[before] > step:
            problems.append(f"stage {k}, step {step} ({a}): runs before its receive {before}")
        if after in seen and seen[after] < step:
            problems.append(f"stage {k}, step {step} ({a}): its send {after} comes first")
    return problems


def validate(sched: Schedule) -> Schedule:
    """Check counts, per-stage order, send/receive matching and that the whole schedule can
    run without a deadlock; raise one ScheduleError naming each problem, with the grid."""
    if len(sched.actions) != sched.stages:
        raise ScheduleError(f"schedule {sched.name!r} has {len(sched.actions)} stage lists for "
                            f"K={sched.stages}; give one list per stage")
    problems = _order_problems(sched)
    if not problems and sched.clock() is None:
        problems.append(_deadlock(sched))
    if problems:
        raise ScheduleError(
            f"schedule {sched.name!r} (K={sched.stages}, M={sched.microbatches}) cannot run:\n  "
            + "\n  ".join(problems) + "\n" + sched.grid())
    return sched


def _deadlock(sched: Schedule) -> str:
    """Name the first action of each stuck stage and what it waits for."""
    done: set[Action] = set()
    pos = [0] * sched.stages
    progress = True
    while progress:
        progress = False
        for k, acts in enumerate(sched.actions):
            while pos[k] < len(acts) and all(d in done for d in _needs(acts[pos[k]], sched)):
                done.add(acts[pos[k]])
                pos[k] += 1
                progress = True
    stuck = [f"stage {k} at step {pos[k]} ({acts[pos[k]]}) waits for "
             + ", ".join(map(str, _needs(acts[pos[k]], sched)))
             for k, acts in enumerate(sched.actions) if pos[k] < len(acts)]
    return "deadlock: " + "; ".join(stuck)
