"""``partition-model [plan]``: partition a profiled model into K stages and write the plan.

    $ partition-model --profile h200/gpt2-medium --stages 4 --microbatches 4 \\
          --global-batch 16 --recompute always -o plan.json
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import replace

from partitioner.cli.main import CliError, describe
from partitioner.cli.options import (
    add_cost_arguments,
    add_solver_arguments,
    cost_model_from_args,
    load_profile_arg,
    memory_limit_from_args,
)
from partitioner.cli.replicas import add_replica_arguments, replicated, topology_from_args
from partitioner.cost.partition import evaluate_assignment
from partitioner.formats.layers import stage_of_nodes
from partitioner.formats.plan import save_plan
from partitioner.formats.plan_schedule import SYNTH
from partitioner.report.plans import plan_report
from partitioner.schedule.generators import SCHEDULES, stages_per_rank_of
from partitioner.solve.planner import make_plan, partition, plan_from_solution
from partitioner.solve.synth import synthesise_for

__all__ = ["main"]


_DEVICE = re.compile(r"^[a-z]+(:[0-9]+)?$")


def _stage_devices(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",")]
    bad = [d for d in devices if not _DEVICE.match(d)]
    if bad:
        raise CliError(f"--stage-devices {text!r}: {', '.join(map(repr, bad))} is not a device "
                       f"name; give one per stage, e.g. cuda:0,cuda:1 or cpu,cpu")
    return devices


def _auto(args: argparse.Namespace) -> list[str]:
    """The schedules ``--schedule auto`` compares: every one that runs K stages V per rank
    (``--stages-per-rank``, default 1), and the synthesised one."""
    v = args.stages_per_rank or 1
    names = []
    for name in SCHEDULES:
        if name == "interleaved" and v == 1:
            continue  # 1F1B's order
        try:
            stages_per_rank_of(name, args.stages, v)
        except ValueError:
            continue
        names.append(name)
    return [*names, SYNTH]


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model", formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --devices is no abbreviation of --devices-per-node
        description="Partition a profiled model into K pipeline stages (exact, memory-limited) "
                    "and write a gpipe-plan/1 plan.", epilog=describe())
    add_cost_arguments(p)
    add_replica_arguments(p)
    p.add_argument("--stage-devices", default=None, metavar="D0,D1,...",
                   help="device of each stage (default: cuda:k on CUDA profiles, else cpu)")
    add_solver_arguments(p, 60.0, "seconds the ILP may search (default 60); it reports "
                         "optimal, or feasible with the proven gap")
    p.add_argument("-o", "--output", default=None, metavar="PLAN.json", help="write the plan")
    args = p.parse_args(argv)
    profile = load_profile_arg(args, warn_graph=args.solver == "dp")
    devices = _stage_devices(args.stage_devices) if args.stage_devices is not None else None
    limit = memory_limit_from_args(args, profile)
    names = [args.schedule] if args.schedule != "auto" else _auto(args)
    topology = topology_from_args(args, profile)
    made = []
    for name in names:
        cm, topo = replicated(cost_model_from_args(args, profile, name), args, topology)
        if topo is not None:  # each layout of the replicas partitioned and simulated
            plan = make_plan(cm, limit, devices, args.solver, args.time_limit,
                             synthesise=name == SYNTH, topology=topo)
            p2p, allreduce = topo.layout_links(plan.rank_layout, plan.build_schedule().rank_of)
            pcm = replace(cm, link=p2p, allreduce_link=allreduce)
            made.append((plan, pcm, evaluate_assignment(pcm, stage_of_nodes(plan.stage_nodes()))))
            continue
        sol = partition(cm, limit / cm.stages_per_rank, args.solver, args.time_limit)
        schedule = (synthesise_for(cm, sol, memory_limit_bytes=limit).schedule
                    if name == SYNTH else None)
        made.append((plan_from_solution(cm, sol, limit, devices, schedule), cm, sol))
    plan, cm, sol = min(made, key=lambda x: x[0].predicted.step_ms if x[0].predicted else 0.0)
    if len(made) > 1:
        print("--schedule auto: " + ", ".join(
            f"{name if name == p.schedule else f'{name} (none faster than {p.schedule})'} "
            f"{p.predicted.step_ms:.3f} ms"
            for name, (p, _, _) in zip(names, made, strict=True) if p.predicted)
            + f"; the fastest: {plan.schedule}\n")
    print(plan_report(plan, cm))
    if plan.extra.get("placement"):
        print(f"replicas: {plan.extra['placement']}")
    if sol.status in ("optimal", "feasible"):
        print(f"solver: CP-SAT, {sol.status} in {sol.solve_s:.2f} s (limit {args.time_limit:g} s),"
              f" proven gap {100 * sol.gap:.2f}% (bottleneck >= {sol.lower_bound_ms:.3f} ms; "
              f"integer scaling of times changes a stage by <= {sol.rounding_error_ms:.2g} ms)")
    if args.output:
        save_plan(plan, args.output)
        print(f"wrote {args.output}")
    return 0
