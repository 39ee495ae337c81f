"""The ``partition-model`` command: plan (default), and the subcommands registered below.

    $ partition-model --profile h200/gpt2-medium --stages 4 --microbatches 4 \\
          --global-batch 16 --recompute always -o plan.json

Every user error exits with status 2 and one message that names the value and the fix.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable, Sequence

from .chain import InfeasibleError
from .costs import (
    LINKS,
    OPTIMIZERS,
    RECOMPUTE_MODES,
    SCHEDULES,
    CostModel,
    Link,
    Runtime,
    default_link,
)
from .plan import PlanError, save_plan
from .planner import SOLVERS, make_plan, plan_from_graph_solution, resolve_solver
from .profile import Profile, ProfileError, load_profile
from .report import plan_report
from .units import parse_bandwidth_gbps, parse_bytes

__all__ = ["add_cost_arguments", "cost_model_from_args", "main"]

#: Subcommands: name -> "module:function" taking argv and returning an exit status. The plan
#: command is the default when the first argument is not a subcommand name.
COMMANDS: dict[str, str] = {
    "plan": "partitioner.cli:plan_main",
    "profile-graph": "executor.graph_profile:profile_graph_main",
    "compare": "partitioner.compare:compare_main",
    "simulate": "partitioner.whatif:simulate_main",
    "search": "partitioner.whatif:search_main",
    "profile": "executor.profile_cli:main",
    "calibrate": "executor.calibrate_cli:main",
    "run": "executor.launch:main",
}

EXIT_USAGE = 2


class CliError(Exception):
    """A user error already phrased for the terminal."""


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} {text!r} must be a whole number >= 1")
        return value
    return parse


def _bytes_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bandwidth_arg(text: str) -> float:
    try:
        return parse_bandwidth_gbps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of ms >= 0")
    return value


def _positive_number(option: str, rule: str) -> Callable[[str], float]:
    """An argparse type: a finite number > 0, else ``option 'text' must be <rule>``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{option} {text!r} must be {rule}")
        return value
    return parse


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``--compute-scale``, ``--action-ms``, ``--message-ms``: the executor's runtime as calibrated
    (``executor.calibrate.measure_runtime``); unset means the profile as it is."""
    scale = _positive_number("--compute-scale", "a number > 0 (1: actions take their profiled "
                             "time)")
    p.add_argument("--compute-scale", type=scale, default=None, metavar="X",
                   help="executor actions take X times their layers' profiled time "
                        "(default 1; fitted by executor.calibrate.measure_runtime)")
    p.add_argument("--action-ms", type=_nonneg_float, default=None, metavar="MS",
                   help="fixed runtime cost of each forward and backward action (default 0)")
    p.add_argument("--message-ms", type=_nonneg_float, default=None, metavar="MS",
                   help="a message between devices reaches its receiver this long after its "
                        "send ends (default 0)")


def runtime_from_args(args: argparse.Namespace, base: Runtime | None = None) -> Runtime:
    base = base or Runtime()
    return Runtime(base.compute_scale if args.compute_scale is None else args.compute_scale,
                   base.action_ms if args.action_ms is None else args.action_ms,
                   base.message_ms if args.message_ms is None else args.message_ms)


def add_cost_arguments(p: argparse.ArgumentParser, stages_required: bool = True) -> None:
    """The options every planning command shares (profile, batch, recompute, link, memory)."""
    p.add_argument("--profile", required=True, metavar="PATH|NAME",
                   help="a gpipe-profile/1 JSON file, or a shipped profile such as "
                        "h200/gpt2-medium")
    if stages_required:
        p.add_argument("--stages", "-K", required=True, type=_positive_int("--stages"),
                       help="pipeline stages K")
        p.add_argument("--microbatches", "-M", required=True,
                       type=_positive_int("--microbatches"), help="micro-batches M per step")
    p.add_argument("--global-batch", "-B", required=True, type=_positive_int("--global-batch"),
                   help="samples per step B (micro-batches of B/M, the first ones larger if "
                        "uneven)")
    p.add_argument("--recompute", choices=RECOMPUTE_MODES, default="except_last",
                   help="re-materialisation (default: except_last)")
    p.add_argument("--schedule", choices=SCHEDULES, default="gpipe",
                   help="pipeline schedule (default: gpipe, fill-drain)")
    p.add_argument("--memory-limit", type=_bytes_arg, default=None, metavar="SIZE",
                   help="per-device memory, e.g. 80GiB (default: the profile's device memory)")
    p.add_argument("--link", choices=sorted(LINKS), default=None,
                   help="link preset between stages (default: nvlink on CUDA, else loopback)")
    p.add_argument("--bandwidth", type=_bandwidth_arg, default=None, metavar="GBPS",
                   help="link bandwidth in GB/s, or inf for free communication "
                        "(overrides --link)")
    p.add_argument("--latency-ms", type=_nonneg_float, default=None,
                   help="per-message link latency in ms (overrides --link)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="optimizer state to budget for (default: adam, fp32 moments and "
                        "master weights for bf16/fp16 models: 16 bytes per parameter)")
    add_runtime_arguments(p)


def add_solver_arguments(p: argparse.ArgumentParser, time_limit_s: float, help_time: str
                         ) -> None:
    """``--solver dp|ilp|auto`` and ``--time-limit S``, shared by plan and search."""
    p.add_argument("--solver", choices=SOLVERS, default="auto",
                   help="dp: exact DP over layer ranges; ilp: CP-SAT over convex sets of the "
                        "layer graph; auto (default): dp for chains, ilp for graph profiles")
    seconds = _positive_number("--time-limit", "a number of seconds > 0")
    p.add_argument("--time-limit", type=seconds, default=time_limit_s, metavar="S",
                   help=help_time)


def link_from_args(args: argparse.Namespace, profile: Profile) -> Link:
    preset = LINKS[args.link or default_link(profile.device.kind)]
    bandwidth = preset.bandwidth_gbps if args.bandwidth is None else args.bandwidth
    if args.latency_ms is not None:
        latency = args.latency_ms
    else:  # --bandwidth inf alone means free communication
        latency = 0.0 if math.isinf(bandwidth) and args.link is None else preset.latency_ms
    return Link(bandwidth, latency)


def load_profile_arg(args: argparse.Namespace, warn_graph: bool = True) -> Profile:
    profile = load_profile(args.profile)
    if profile.edges is not None and warn_graph:
        print(f"warning: profile {profile.model!r} has edges (a graph); planning it as a chain "
              f"in its layer order", file=sys.stderr)
    return profile


def cost_model_from_args(args: argparse.Namespace, profile: Profile, stages: int,
                         microbatches: int) -> CostModel:
    return CostModel(profile, args.global_batch, microbatches, stages=stages,
                     recompute=args.recompute, schedule=args.schedule,
                     link=link_from_args(args, profile), optimizer=args.optimizer,
                     runtime=runtime_from_args(args))


def memory_limit_from_args(args: argparse.Namespace, profile: Profile) -> float:
    return float(args.memory_limit or profile.device.memory_bytes or math.inf)


def plan_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model",
        description="Partition a profiled model into K pipeline stages (exact, memory-limited) "
                    "and write a gpipe-plan/1 plan. Subcommands: " + ", ".join(COMMANDS) + ".")
    add_cost_arguments(p)
    p.add_argument("--devices", default=None, metavar="D0,D1,...",
                   help="device of each stage (default: cuda:k on CUDA profiles, else cpu)")
    add_solver_arguments(p, 60.0, "seconds the ILP may search (default 60); it reports "
                         "optimal, or feasible with the proven gap")
    p.add_argument("-o", "--output", default=None, metavar="PLAN.json", help="write the plan")
    args = p.parse_args(argv)
    profile = load_profile_arg(args, warn_graph=args.solver == "dp")
    cm = cost_model_from_args(args, profile, args.stages, args.microbatches)
    devices = args.devices.split(",") if args.devices else None
    limit = memory_limit_from_args(args, profile)
    if resolve_solver(args.solver, cm) == "ilp":
        from .ilp import partition_graph  # OR-Tools only when asked

        sol = partition_graph(cm, limit, time_limit_s=args.time_limit)
        plan = plan_from_graph_solution(cm, sol, limit, devices)
        print(plan_report(plan, cm))
        print(f"solver: CP-SAT, {sol.status} in {sol.solve_s:.2f} s (limit {args.time_limit:g} s),"
              f" proven gap {100 * sol.gap:.2f}% (bottleneck >= {sol.lower_bound_ms:.3f} ms; "
              f"integer scaling of times changes a stage by <= {sol.rounding_error_ms:.2g} ms)")
    else:
        plan = make_plan(cm, limit, devices)
        print(plan_report(plan, cm))
    if args.output:
        save_plan(plan, args.output)
        print(f"wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in COMMANDS else "plan"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    module, func = COMMANDS[name].split(":")
    command: Callable[[Sequence[str]], int] = getattr(importlib.import_module(module), func)
    try:
        return command(rest)
    except (ProfileError, PlanError, InfeasibleError, CliError, FileNotFoundError,
            ValueError) as exc:
        prog = "partition-model" if name == "plan" else f"partition-model {name}"
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
