"""The ``simulate`` and ``search`` subcommands: replay a plan under what-if overrides, or search
K, M, recompute and schedule for the fastest simulated step.

    $ partition-model simulate plan.json --devices 1 --png step.png
    $ partition-model search --profile h200/gpt2-medium --devices 8 --global-batch 16 -o best.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import replace

from .cli import (
    CliError,
    _bandwidth_arg,
    _nonneg_float,
    _positive_int,
    add_cost_arguments,
    add_runtime_arguments,
    add_solver_arguments,
    link_from_args,
    load_profile_arg,
    memory_limit_from_args,
    runtime_from_args,
)
from .costs import LINKS, OPTIMIZERS, RECOMPUTE_MODES, SCHEDULES, CostModel
from .gantt import PlotUnavailableError, save_gantt_png
from .plan import Plan, PlanError, load_plan, save_plan
from .profile import Profile, load_profile, shipped_profiles
from .report import format_ranges, format_table
from .search import search, search_table
from .simulate import SimResult, device_indices, ranges_from_boundaries, simulate
from .timeline import save_chrome_trace
from .units import format_bytes

__all__ = ["find_profile", "search_main", "simulate_main", "simulate_plan"]


def find_profile(plan: Plan, path_or_name: str | None = None) -> Profile:
    """The profile a plan was made from: ``path_or_name`` if given (checked against the plan's
    sha256), else the shipped profile of the plan's model whose sha256 matches."""
    if path_or_name is not None:
        profile = load_profile(path_or_name)
        plan.check_against(plan.num_layers, profile)
        return profile
    names = shipped_profiles()
    named = [n for n in names if n.rsplit("/", 1)[-1] == plan.profile_model]
    for name in named + [n for n in names if n not in named]:
        profile = load_profile(name)
        if profile.model == plan.profile_model and profile.sha256() == plan.profile_sha256:
            return profile
    raise PlanError(f"the plan was made from profile {plan.profile_model!r} (sha256 "
                    f"{plan.profile_sha256[:12]}…), which is not among the shipped profiles; "
                    f"give it with --profile PATH")


def simulate_plan(plan: Plan, profile: Profile, *, num_devices: int | None = None,
                  **overrides: object) -> tuple[SimResult, CostModel, list[int]]:
    """Simulate a plan, optionally with other ``global_batch``, ``microbatches``, ``schedule``,
    ``recompute``, ``link``, ``optimizer`` (CostModel fields) and ``optimizer_ms``; with
    ``num_devices`` = N < K, stages go onto N devices in contiguous blocks."""
    big_k = plan.num_stages
    optimizer_ms = float(overrides.pop("optimizer_ms", 0.0))  # type: ignore[arg-type]
    fields: dict[str, object] = {
        "global_batch": plan.global_batch, "microbatches": plan.microbatches,
        "schedule": plan.schedule, "recompute": plan.recompute, "link": plan.link,
        "optimizer": plan.optimizer, "runtime": plan.runtime}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    cm = CostModel(profile, stages=big_k, **fields)  # type: ignore[arg-type]
    if num_devices is None:
        devices = device_indices([s.device for s in plan.stages])
    elif 1 <= num_devices <= big_k:
        devices = [k * num_devices // big_k for k in range(big_k)]
    else:
        raise ValueError(f"--devices {num_devices}: the plan has K={big_k} stages, so it runs "
                         f"on 1..{big_k} devices; for more devices plan again with --stages "
                         f"{num_devices}, or let `partition-model search --devices "
                         f"{num_devices}` choose K")
    if plan.is_graph:
        res = simulate(cm, nodes=[s.nodes or () for s in plan.stages], devices=devices,
                       optimizer_ms=optimizer_ms)
    else:
        res = simulate(cm, ranges_from_boundaries(plan.boundaries), devices=devices,
                       optimizer_ms=optimizer_ms)
    return res, cm, devices


def simulate_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model simulate",
        description="Replay a plan's schedule in the simulator and print step time, bubble, "
                    "per-stage busy time and peak memory; options override the plan (what-if).")
    p.add_argument("plan", metavar="PLAN.json")
    p.add_argument("--profile", default=None, metavar="PATH|NAME",
                   help="the profile the plan was made from (default: the shipped profile "
                        "of the plan's model, checked by sha256)")
    p.add_argument("--devices", type=_positive_int("--devices"), default=None, metavar="N",
                   help="run the K stages on N <= K devices (contiguous blocks; 1: all on one)")
    p.add_argument("--microbatches", "-M", type=_positive_int("--microbatches"), default=None)
    p.add_argument("--global-batch", "-B", type=_positive_int("--global-batch"), default=None)
    p.add_argument("--schedule", choices=SCHEDULES, default=None)
    p.add_argument("--recompute", choices=RECOMPUTE_MODES, default=None)
    p.add_argument("--link", choices=sorted(LINKS), default=None, help="link preset")
    p.add_argument("--bandwidth", type=_bandwidth_arg, default=None, metavar="GBPS")
    p.add_argument("--latency-ms", type=_nonneg_float, default=None)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    p.add_argument("--optimizer-ms", type=_nonneg_float, default=0.0,
                   help="optimizer step of the whole model, split over stages by parameters")
    add_runtime_arguments(p)
    p.add_argument("--trace", default=None, metavar="OUT.json",
                   help="write the predicted timeline as a Chrome trace (Perfetto)")
    p.add_argument("--png", default=None, metavar="OUT.png", help="write a Gantt chart")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    plan = load_plan(args.plan)
    profile = find_profile(plan, args.profile)
    link = plan.link
    if args.link or args.bandwidth is not None or args.latency_ms is not None:
        preset = LINKS[args.link] if args.link else plan.link
        link = replace(preset, **{k: v for k, v in (("bandwidth_gbps", args.bandwidth),
                                                     ("latency_ms", args.latency_ms))
                                  if v is not None})
    res, cm, devices = simulate_plan(
        plan, profile, num_devices=args.devices, global_batch=args.global_batch,
        microbatches=args.microbatches, schedule=args.schedule, recompute=args.recompute,
        link=link, optimizer=args.optimizer, optimizer_ms=args.optimizer_ms,
        runtime=runtime_from_args(args, plan.runtime))
    assert res.timeline is not None
    if args.trace:
        save_chrome_trace(res.timeline, args.trace)
    if args.png:
        try:
            save_gantt_png([res.timeline], args.png, [f"predicted {plan.profile_model}, "
                                                      f"{cm.schedule}, M={cm.microbatches}"])
        except PlotUnavailableError as exc:
            raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps({"step_ms": res.step_ms, "bubble_fraction": res.bubble_fraction,
                          "stage_busy_ms": list(res.stage_busy_ms),
                          "stage_comm_ms": list(res.stage_comm_ms),
                          "stage_peak_bytes": list(res.stage_peak_bytes)}))
    else:
        print(_simulate_report(plan, cm, res, devices))
    for what, path in (("trace", args.trace), ("Gantt chart", args.png)):
        if path:
            print(f"wrote {what} {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _simulate_report(plan: Plan, cm: CostModel, res: SimResult, devices: list[int]) -> str:
    big_k, m = plan.num_stages, cm.microbatches
    link = ("free" if math.isinf(cm.link.bandwidth_gbps) and cm.link.latency_ms == 0
            else f"{cm.link.bandwidth_gbps:g} GB/s + {cm.link.latency_ms:g} ms")
    head = (f"{plan.profile_model}: K={big_k} stages on {len(set(devices))} device(s), M={m} "
            f"(B={cm.global_batch}), schedule={cm.schedule}, recompute={cm.recompute}, "
            f"link {link}")
    rows = [[k, format_ranges(s.nodes) if s.nodes is not None else
             f"[{s.layers[0]}, {s.layers[1]})", devices[k], f"{res.stage_busy_ms[k]:.3f}",
             f"{res.stage_comm_ms[k]:.3f}",
             f"{res.step_ms - res.stage_busy_ms[k] - res.stage_comm_ms[k]:.3f}",
             format_bytes(res.stage_peak_bytes[k])] for k, s in enumerate(plan.stages)]
    table = format_table(["stage", "nodes" if plan.is_graph else "layers", "device", "busy_ms", "send_ms", "idle_ms",
                          "peak_memory"], rows)
    ideal = (big_k - 1) / (m + big_k - 1)
    summary = (f"simulated step {res.step_ms:.3f} ms, bubble {100 * res.bubble_fraction:.1f}% "
               f"(balanced ideal {100 * ideal:.1f}%), {1000 * cm.global_batch / res.step_ms:.1f}"
               f" samples/s")
    if plan.predicted is not None:
        summary += f"; the plan predicted {plan.predicted.step_ms:.3f} ms"
    return "\n".join([head, "", table, "", summary])


def search_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model search", conflict_handler="resolve",  # lists replace choices
        description="Try K <= N stages, M micro-batches, recompute modes and schedules; print "
                    "the fastest by simulated step and write the best plan.")
    add_cost_arguments(p, stages_required=False)
    p.add_argument("--devices", "-N", required=True, type=_positive_int("--devices"),
                   help="devices available: K ranges over 1..N")
    p.add_argument("--schedules", "--schedule", default=",".join(SCHEDULES), metavar="S1,S2",
                   help=f"schedules to try (default: {','.join(SCHEDULES)})")
    p.add_argument("--recompute", default=",".join(RECOMPUTE_MODES), metavar="R1,R2",
                   help=f"recompute modes to try (default: {','.join(RECOMPUTE_MODES)})")
    p.add_argument("--microbatches", default=None, metavar="M1,M2",
                   help="micro-batch counts to try (default with the DP: every M up to 64, "
                        "then the fewest M for each micro-batch size; with the ILP: the "
                        "fewest M for micro-batches of B, 1, 2, 4, ...)")
    add_solver_arguments(p, 10.0, "seconds each ILP partition may take (default 10); the "
                         "table says which were proven optimal")
    p.add_argument("--top", type=_positive_int("--top"), default=10, help="rows to print")
    p.add_argument("-o", "--output", default=None, metavar="BEST.json",
                   help="write the best plan")
    args = p.parse_args(argv)
    profile = load_profile_arg(args, warn_graph=args.solver == "dp")
    try:
        ms = [int(x) for x in args.microbatches.split(",")] if args.microbatches else None
    except ValueError:
        raise CliError(f"--microbatches {args.microbatches!r} is not a comma-separated list "
                       f"of whole numbers, e.g. 1,2,4,8") from None
    limit = memory_limit_from_args(args, profile)
    result = search(profile, args.devices, args.global_batch, limit,
                    schedules=_names(args.schedules), recompute=_names(args.recompute),
                    link=link_from_args(args, profile), optimizer=args.optimizer,
                    microbatches=ms, solver=args.solver, time_limit_s=args.time_limit,
                    runtime=runtime_from_args(args))
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


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]

