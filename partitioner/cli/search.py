"""``partition-model search``: try K, M, recompute and schedule; print the fastest, write the best.

    $ partition-model search --profile h200/gpt2-medium --devices 8 --global-batch 16 -o best.json
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from partitioner.cli.options import (
    add_cost_arguments,
    add_solver_arguments,
    count,
    count_list,
    link_from_args,
    load_profile_arg,
    memory_limit_from_args,
    runtime_from_args,
)
from partitioner.formats.plan import save_plan
from partitioner.report.plans import search_table
from partitioner.schedule.generators import MAX_MICROBATCHES
from partitioner.solve.search import search

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model search",
        description="Try K <= N stages, M micro-batches, recompute modes and schedules; print "
                    "the fastest by simulated step and write the best plan.")
    add_cost_arguments(p, search=True)
    p.add_argument("--devices", "-N", required=True, type=count("--devices"), metavar="N",
                   help="devices available: K ranges over 1..N")
    p.add_argument("--microbatches", "-M", default=None, metavar="M1,M2",
                   type=count_list("--microbatches", high=MAX_MICROBATCHES),
                   help="micro-batch counts to try (default with the DP: every M up to 64, "
                        "then, up to 1,024, the fewest M for each micro-batch size; with the "
                        "ILP: the fewest M for micro-batches of B, 1, 2, 4, ...)")
    add_solver_arguments(p, 10.0, "seconds each ILP partition may take (default 10); the "
                         "table says which were proven optimal")
    p.add_argument("--top", type=count("--top"), default=10, help="rows to print")
    p.add_argument("-o", "--output", default=None, metavar="BEST.json",
                   help="write the best plan")
    args = p.parse_args(argv)
    profile = load_profile_arg(args, warn_graph=args.solver == "dp")
    limit = memory_limit_from_args(args, profile)
    result = search(profile, args.devices, args.global_batch, limit,
                    schedules=args.schedules, recompute=args.recompute,
                    link=link_from_args(args, profile), optimizer=args.optimizer,
                    microbatches=args.microbatches, solver=args.solver,
                    time_limit_s=args.time_limit, runtime=runtime_from_args(args))
    print(f"{profile.model} on {profile.device.name}, B={args.global_batch}, up to "
          f"{args.devices} devices, M in {','.join(map(str, result.microbatches))}, "
          f"fastest by simulated step:\n")
    print(search_table(result, args.top))
    best = result.best
    print(f"\nbest: K={best.stages}, M={best.microbatches}, {best.schedule}, recompute "
          f"{best.recompute}: {best.step_ms:.3f} ms per step")
    if args.output:
        save_plan(result.best_plan(), args.output)
        print(f"wrote {args.output}")
    return 0
