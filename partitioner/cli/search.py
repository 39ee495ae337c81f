"""``partition-model search``: try K, M, recompute and schedule; print the fastest, write the best.

    $ partition-model search --profile h200/gpt2-medium --devices 8 --global-batch 16 -o best.json
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from partitioner.cli.main import CliError
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
from partitioner.cli.replicas import add_replica_arguments, topology_from_args
from partitioner.formats.plan import save_plan
from partitioner.report.plans import search_table
from partitioner.schedule.generators import MAX_MICROBATCHES
from partitioner.solve.search import search
from partitioner.solve.synth import available_jobs

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model search", allow_abbrev=False,
        description="Try K <= N stages, M micro-batches, recompute modes and schedules; print "
                    "the fastest by simulated step and write the best plan.")
    add_cost_arguments(p, search=True)
    p.add_argument("--devices", "-N", default=None, type=count("--devices"), metavar="N",
                   help="devices available: K x D ranges up to N (default with --nodes: "
                        "nodes x devices per node)")
    add_replica_arguments(p, search=True)
    p.add_argument("--microbatches", "-M", default=None, metavar="M1,M2",
                   type=count_list("--microbatches", high=MAX_MICROBATCHES),
                   help="micro-batch counts to try (default with the DP: every M up to 64, "
                        "then, up to 1,024, the fewest M for each micro-batch size; with the "
                        "ILP: the fewest M for micro-batches of B, 1, 2, 4, ...)")
    add_solver_arguments(p, 10.0, "seconds each ILP partition may take (default 10); the "
                         "table says which were proven optimal")
    p.add_argument("--top", type=count("--top"), default=10, help="rows to print")
    p.add_argument("--jobs", "-j", type=count("--jobs"), default=None, metavar="N",
                   help="processes that synthesise schedules at once (default: one per core "
                        "this process may use; 1: none besides this one)")
    p.add_argument("-o", "--output", default=None, metavar="BEST.json",
                   help="write the best plan")
    args = p.parse_args(argv)
    profile = load_profile_arg(args, warn_graph=args.solver == "dp")
    limit = memory_limit_from_args(args, profile)
    topology = topology_from_args(args, profile)
    if args.devices is None and topology is None:
        raise CliError("give the devices to search over: --devices N, or a topology with "
                       "--nodes N --devices-per-node G")
    devices = args.devices if args.devices is not None else topology.devices  # type: ignore[union-attr]
    result = search(profile, devices, args.global_batch, limit,
                    schedules=args.schedules, recompute=args.recompute,
                    link=link_from_args(args, profile), optimizer=args.optimizer,
                    microbatches=args.microbatches, solver=args.solver,
                    time_limit_s=args.time_limit, runtime=runtime_from_args(args, profile=profile),
                    topology=topology, replicas=args.replicas,
                    shard_optimizer=args.shard_optimizer, allreduce=args.allreduce,
                    keep=args.top, jobs=args.jobs or available_jobs())
    print(f"{profile.model} on {profile.device.name}, B={args.global_batch}, up to "
          f"{devices} devices, D in {','.join(map(str, result.replicas))}, M in "
          f"{','.join(map(str, result.microbatches))}, "
          f"fastest by simulated step:\n")
    print(search_table(result, args.top))
    best = result.best
    for what, cand in (("pure pipeline (D=1)", result.best_where(lambda c: c.replicas == 1)),
                       ("pure data parallel (K=1)", result.best_where(lambda c: c.stages == 1))):
        if len(result.replicas) > 1 and cand is not None:
            print(f"best {what}: K={cand.stages}, D={cand.replicas}, M={cand.microbatches}, "
                  f"{cand.schedule}: {cand.step_ms:.3f} ms, "
                  f"{1000 * args.global_batch / cand.step_ms:.1f} samples/s")
    print(f"\nbest: K={best.stages}, D={best.replicas}, M={best.microbatches}, {best.schedule}, "
          f"recompute {best.recompute}: {best.step_ms:.3f} ms per step"
          + (f" ({best.placement.name})" if best.replicas > 1 and best.placement else ""))
    if args.output:
        save_plan(result.best_plan(), args.output)
        print(f"wrote {args.output}")
    return 0
