"""A plan's schedule: the generator it names with V stages per rank, or the actions it lists.

    >>> sched = schedule_of("zbv", stages=4, microbatches=4, stages_per_rank=2, actions=None)
    >>> sched.placement, sched.ranks
    ((0, 1, 1, 0), 2)

A plan names a fixed schedule (``gpipe``, ``1f1b``, ``interleaved``, ``zb-h1``, ``zbv``) that
``schedule.generators`` rebuilds from K, M and V, or, for a schedule synthesised from measured
times (``synth``), carries its actions as text, one line per rank (``Schedule.parse``): what
the simulator predicted is then exactly what the executor runs. The ranks of the stages are
the schedule's placement (stage k runs on rank ``placement[k]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from partitioner.formats.checks import Problems, show
from partitioner.schedule.generators import SCHEDULES, make_schedule, stages_per_rank_of
from partitioner.schedule.ir import Schedule, ScheduleError, validate

__all__ = ["PLAN_SCHEDULES", "SYNTH", "parse_schedule_fields", "schedule_fields", "schedule_of"]

#: The name of a schedule built from measured times (``schedule.synthesis``); a plan lists it.
SYNTH = "synth"
#: Every schedule a plan may name.
PLAN_SCHEDULES: tuple[str, ...] = (*SCHEDULES, SYNTH)


def schedule_of(name: str, stages: int, microbatches: int, stages_per_rank: int,
                actions: str | None) -> Schedule:
    """The schedule of a plan (raises ValueError naming what does not fit)."""
    if actions is None:
        if name == SYNTH:
            raise ValueError("a 'synth' schedule lists its actions; the plan has none: make it "
                             "again with partition-model --schedule synth")
        return make_schedule(name, stages, microbatches, stages_per_rank)
    sched = Schedule.parse(actions, name)
    if (sched.stages, sched.microbatches) != (stages, microbatches):
        raise ValueError(f"the plan's actions are for K={sched.stages}, M={sched.microbatches} "
                         f"but it has K={stages} stages and M={microbatches}")
    per_rank = {sched.rank_of.count(r) for r in range(sched.ranks)}
    if per_rank != {stages_per_rank}:
        raise ValueError(f"the plan's actions put {sorted(per_rank)} stages on a rank but it "
                         f"says stages_per_rank={stages_per_rank}")
    return validate(sched)


def parse_schedule_fields(data: Mapping[str, Any], stages: int, microbatches: int,
                          p: Problems) -> tuple[str, int, str | None]:
    """``schedule``, ``stages_per_rank`` (default 1; ``zbv``: 2) and ``actions`` of a plan's
    JSON, each problem added to ``p`` with its path."""
    name = data.get("schedule", SCHEDULES[0])
    if name not in PLAN_SCHEDULES:
        p.add("schedule", f"{show(name)} is not one of {', '.join(PLAN_SCHEDULES)}")
        return SCHEDULES[0], 1, None
    default_v = 2 if name == "zbv" else 1
    v = p.whole(data.get("stages_per_rank", default_v), "stages_per_rank", low=1,
                high=max(stages, 1), default=default_v)
    actions = data.get("actions")
    if actions is not None and not isinstance(actions, str):
        p.add("actions", f"{show(actions)} is not the schedule's text (one line per rank, "
                         f"e.g. '0: 0F0 0B0')")
        actions = None
    if stages >= 1 and not p:
        try:
            if name != SYNTH:
                stages_per_rank_of(name, stages, v)
            schedule_of(name, stages, microbatches, v, actions)
        except (ValueError, ScheduleError) as exc:
            p.add("actions" if actions is not None else "stages_per_rank", str(exc))
    return str(name), v, actions


def schedule_fields(name: str, stages_per_rank: int, actions: str | None) -> dict[str, Any]:
    """The JSON fields beyond ``schedule`` (none for one stage per rank without actions)."""
    out: dict[str, Any] = {}
    if stages_per_rank != 1:
        out["stages_per_rank"] = stages_per_rank
    if actions is not None:
        out["actions"] = actions
    return out
