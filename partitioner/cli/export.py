"""``partition-model export-schedule``: write a plan's schedule for another runtime.

    $ partition-model export-schedule plan.json --format torch-csv -o schedule.csv
    $ partition-model export-schedule plan.json --format text

``torch-csv`` is torch.distributed.pipelining's compute-only CSV (``schedule.torchcsv``): load
it with ``_PipelineScheduleRuntime(stages, M, loss_fn)._load_csv(path)`` on each rank, the
stages of each rank being those its row names. ``text`` is the project's own form, one line
per rank (``Schedule.parse`` reads it back). A plan that torch's runtime cannot run as planned
is refused with the reason: micro-batches of unequal size (torch infers the shape of every
message once, from micro-batch 0) and, for graph plans, a stage that sends to a stage other
than the next (torch's runtime sends between adjacent stages only). The file holds the order
of the actions only: which layers each stage runs, and re-materialisation, stay with the
stage modules.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from partitioner.cli.main import CliError
from partitioner.formats.plan import Plan, load_plan
from partitioner.schedule.torchcsv import to_torch_csv

__all__ = ["FORMATS", "main", "torch_problems"]

#: What ``--format`` may name.
FORMATS = ("torch-csv", "text")


def torch_problems(plan: Plan) -> list[str]:
    """Why torch.distributed.pipelining cannot run ``plan`` as planned (empty: it can)."""
    problems = []
    b, m = plan.global_batch, plan.microbatches
    if b % m:
        problems.append(f"global batch B={b} is not a multiple of M={m}: torch's PipelineStage "
                        f"infers each message's shape once, from micro-batch 0, and receives "
                        f"every micro-batch into buffers of that shape; plan again with B a "
                        f"multiple of M (e.g. B={m * max(b // m, 1)})")
    skips = sorted((src, dst) for src, dst in plan.messages if dst != src + 1)
    if skips:
        pairs = ", ".join(f"{src}->{dst}" for src, dst in skips)
        problems.append(f"stages send to stages other than the next ({pairs}): torch's runtime "
                        f"sends between adjacent stages only; partition the model as a chain "
                        f"(an nn.Sequential), or pass the skipped values through the stages "
                        f"in between")
    return problems


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model export-schedule",
        description="Write a plan's schedule in another runtime's form: torch-csv, the "
                    "compute-only CSV of torch.distributed.pipelining (_load_csv), or text, "
                    "this project's one line per rank.")
    p.add_argument("plan", metavar="PLAN.json")
    p.add_argument("--format", choices=FORMATS, default="torch-csv",
                   help="torch-csv (default) or text")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="where to write it (default: standard output)")
    args = p.parse_args(argv)
    plan = load_plan(args.plan)
    sched = plan.build_schedule()
    if args.format == "torch-csv":
        problems = torch_problems(plan)
        if problems:
            raise CliError(f"{args.plan}: torch.distributed.pipelining cannot run this plan:\n  "
                           + "\n  ".join(problems))
        text = to_torch_csv(sched)
    else:
        text = str(sched) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {plan.schedule} (K={sched.stages}, M={sched.microbatches}, "
              f"{sched.ranks} ranks, stage k on rank {list(sched.rank_of)}) as "
              f"{args.format} to {args.output}", file=sys.stderr)
    if plan.recompute != "never" and args.format == "torch-csv":
        print(f"note: the plan re-materialises (recompute={plan.recompute}); torch's runtime "
              f"does not: wrap the stage modules in torch.utils.checkpoint for the same memory",
              file=sys.stderr)
    return 0
