"""A schedule in torch.distributed.pipelining's compute-only CSV form, and back (no torch).

    >>> from partitioner.schedule.generators import zb_h1
    >>> print(to_torch_csv(zb_h1(2, 2)), end="")
    0F0,0F1,,0I0,0W0,0I1,0W1
    ,1F0,1I0,1F1,1I1,1W0,1W1

The form (torch 2.13, ``schedules.py``: ``_Action.from_str``, ``PipelineScheduleMulti._load_csv``,
``_PipelineScheduleRuntime._load_csv`` with ``format="compute_only"``): one CSV row per rank of
the pipeline group, one column per time step, each cell one action or empty (that rank idles at
that step). An action is ``{stage}{type}{microbatch}``, the same text as ours: torch's
``FORWARD`` is ``F``, ``FULL_BACKWARD`` ``B``, ``BACKWARD_INPUT`` ``I`` and ``BACKWARD_WEIGHT``
``W``. Torch infers the rank of each stage from the row that holds its actions, so interleaved
and V placements travel as they are; it adds the sends and receives itself, so a lowered
schedule (SF/RF/SB/RB) is refused here. The columns are our unit-time replay
(``Schedule.clock``): what torch's own schedules write, and what its grid printer shows.
"""

from __future__ import annotations

import csv
import io

from partitioner.schedule.ir import COMPUTE, Action, Schedule, ScheduleError, validate

__all__ = ["from_torch_csv", "to_torch_csv"]


def to_torch_csv(sched: Schedule) -> str:
    """The schedule as torch's compute-only CSV text (rows end in ``\\n``). Raises
    ScheduleError if the schedule cannot run, ValueError if it is lowered."""
    if sched.is_lowered:
        raise ValueError(f"schedule {sched.name!r} is lowered (it has sends and receives); "
                         f"torch's compute-only CSV holds F, B, I and W only and torch adds the "
                         f"communication itself: export the schedule before lower()")
    steps = validate(sched).clock()
    assert steps is not None  # validate() refuses a schedule that deadlocks
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for r in range(sched.ranks):
        writer.writerow(["" if row[r] is None else str(row[r]) for row in steps])
    return out.getvalue()


def from_torch_csv(text: str, name: str = "torch") -> Schedule:
    """The schedule of a compute-only CSV (one row per rank; empty cells are idle steps), as
    torch's ``_dump_csv(..., format="compute_only")`` writes it. Raises ValueError for a cell
    that is not F, B, I or W (torch's communication and FSDP actions have no place in it) and
    ScheduleError for a schedule that cannot run."""
    rows: list[list[Action]] = []
    problems = []
    for r, cells in enumerate(csv.reader(io.StringIO(text))):
        row = []
        for step, cell in enumerate(cells):
            if not cell.strip():
                continue
            try:
                action = Action.parse(cell)
            except ValueError:
                action = None
            if action is None or action.kind not in COMPUTE:
                problems.append(f"rank {r}, step {step}: {cell.strip()!r}")
            else:
                row.append(action)
        rows.append(row)
    if problems:
        raise ValueError("not a compute-only schedule: " + "; ".join(problems)
                         + "; each cell must be empty or {stage}{F|B|I|W}{microbatch}, e.g. "
                           "'1F3' (dump torch's schedule with format='compute_only')")
    if not rows:
        raise ValueError("the CSV has no rows; give one row of actions per rank")
    body = "\n".join(f"{r}: " + " ".join(map(str, row)) for r, row in enumerate(rows))
    try:
        return validate(Schedule.parse(body, name))
    except ScheduleError:
        raise
    except ValueError as exc:
        raise ValueError(f"the CSV's rows do not form a schedule: {exc}") from None
