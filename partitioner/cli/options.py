"""Options the commands share: one parser per kind of value, one meaning per option name.

    >>> count("--stages")("4"), number("--compute-scale", "a number > 0")("1.5")
    (4, 1.5)
    >>> count("--stages")("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: --stages '0' must be a whole number >= 1

Names: ``--devices N`` is always a number of devices; ``--stage-devices D0,D1`` the device of
each stage; ``--device D`` the one device a command runs on; ``--microbatches`` is M (a list
where a command tries several); ``--microbatch-sizes`` the sizes b a profile measures.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

from partitioner.cli.main import CliError
from partitioner.cost.model import CostModel
from partitioner.formats.assumptions import (
    LINKS,
    MAX_COMPUTE_SCALE,
    OPTIMIZERS,
    Link,
    Runtime,
    default_link,
)
from partitioner.formats.device import device_model_for, load_device_model, shipped_device_models
from partitioner.formats.plan import MAX_GLOBAL_BATCH
from partitioner.formats.plan_schedule import PLAN_SCHEDULES, SYNTH
from partitioner.formats.profile import Profile, load_profile
from partitioner.formats.steps import Steps, load_steps
from partitioner.formats.units import MAX_MS, NO_LIMIT_BYTES, parse_bandwidth_gbps, parse_bytes
from partitioner.schedule.generators import MAX_MICROBATCHES
from partitioner.schedule.recompute import RECOMPUTE_MODES
from partitioner.solve.planner import SOLVERS

__all__ = ["add_cost_arguments", "add_link_arguments", "add_runtime_arguments",
           "add_solver_arguments", "bandwidth",
           "choices", "cost_model_from_args", "count", "count_list", "link_from_args",
           "load_profile_arg", "load_steps_arg", "memory_limit_from_args", "milliseconds", "number",
           "runtime_from_args", "shape", "size"]


def count(option: str, low: int = 1, high: float = math.inf) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high], else ``option 'text' must be ...``."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            rule = f">= {low}" if math.isinf(high) else f"in {low}..{high:g}"
            raise argparse.ArgumentTypeError(f"{option} {text!r} must be a whole number {rule}")
        return value
    return parse


def count_list(option: str, low: int = 1, high: float = math.inf) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated whole numbers, each in [low, high], sorted, unique."""
    one = count(option, low, high)

    def parse(text: str) -> list[int]:
        parts = [t for t in text.split(",") if t.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{option} {text!r} must list whole numbers "
                                             f"separated by commas, e.g. 1,2,4")
        try:
            return sorted({one(t) for t in parts})
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"{option} {text!r} must list whole numbers >= {low}"
                f"{'' if math.isinf(high) else f' and <= {high:g}'} separated by commas, "
                f"e.g. 1,2,4") from None
    return parse


def shape(option: str, high: int = 2**16) -> Callable[[str], list[int]]:
    """An argparse type: a tensor shape, comma-separated sizes >= 1 in order (e.g. 3,64,64)."""
    one = count(option, 1, high)

    def parse(text: str) -> list[int]:
        try:
            dims = [one(t) for t in text.split(",")]
        except argparse.ArgumentTypeError:
            dims = []
        if not dims or len(dims) > 8:
            raise argparse.ArgumentTypeError(f"{option} {text!r} must be up to 8 sizes in "
                                             f"1..{high} separated by commas, e.g. 3,64,64")
        return dims
    return parse


def number(option: str, rule: str, low: float = 0.0, high: float = math.inf,
           low_ok: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number > low (>= low with ``low_ok``) and <= high, else
    ``option 'text' must be <rule>``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value >= low if low_ok else value > low
        if not (math.isfinite(value) and above and value <= high):
            raise argparse.ArgumentTypeError(f"{option} {text!r} must be {rule}")
        return value + 0.0  # -0 is 0
    return parse


def milliseconds(option: str) -> Callable[[str], float]:
    """An argparse type: a number of milliseconds in 0..MAX_MS."""
    return number(option, f"a number of ms in 0..{MAX_MS:g}", high=MAX_MS, low_ok=True)


def choices(option: str, allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of ``allowed``."""
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"{option} {text!r}: {', '.join(map(repr, bad)) or 'nothing'} is not one of "
                f"{', '.join(allowed)}; give one or more, separated by commas")
        return list(dict.fromkeys(names))
    return parse


def size(option: str) -> Callable[[str], int]:
    """An argparse type: a byte size such as 80GiB, or inf."""
    def parse(text: str) -> int:
        try:
            return parse_bytes(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{option}: {exc}") from None
    return parse


def bandwidth(text: str) -> float:
    """An argparse type: a bandwidth in GB/s, or inf."""
    try:
        return parse_bandwidth_gbps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--bandwidth: {exc}") from None


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``--compute-scale``, ``--action-ms``, ``--message-ms``: the executor's runtime as calibrated
    (``partition-model calibrate``); unset means the profile as it is."""
    p.add_argument("--compute-scale", default=None, metavar="X", type=number(
        "--compute-scale", f"a number > 0 and <= {MAX_COMPUTE_SCALE:g} (1: actions take their "
        f"profiled time)", high=MAX_COMPUTE_SCALE),
        help="executor actions take X times their layers' profiled time (default 1; "
             "partition-model calibrate measures it)")
    p.add_argument("--action-ms", type=milliseconds("--action-ms"), default=None, metavar="MS",
                   help="fixed runtime cost of each forward and backward action (default 0)")
    p.add_argument("--message-ms", type=milliseconds("--message-ms"), default=None,
                   metavar="MS", help="a message between devices reaches its receiver this "
                                      "long after its send ends (default 0)")
    p.add_argument("--device-model", default=None, metavar="auto|none|NAME|PATH",
                   help="how a GPU runs the profile's alone-timed layers inside a step (a host "
                        "that runs ahead of the device): a shipped model ("
                        f"{', '.join(shipped_device_models())}), a gpipe-device/1 file "
                        "(partition-model calibrate --steps writes one), none, or auto (the "
                        "default; a plan's own when simulating one): the shipped model of the "
                        "profile's GPU where its layers were timed alone, else none")


def runtime_from_args(args: argparse.Namespace, base: Runtime | None = None,
                      profile: Profile | None = None) -> Runtime:
    """The runtime the options give, each unset one taken from ``base`` (a plan's; default:
    Runtime() with the ``--device-model auto`` choice for ``profile``)."""
    choice = getattr(args, "device_model", None) or ("plan" if base is not None else "auto")
    base = base or Runtime()
    device = base.device
    if choice == "none":
        device = None
    elif choice == "auto":
        device = device_model_for(profile.device.name, profile.device.kind, profile.how
                                  ) if profile is not None else None
    elif choice != "plan":
        try:
            device = load_device_model(choice)
        except (OSError, ValueError) as exc:
            raise CliError(f"--device-model: {exc}") from None
    return Runtime(base.compute_scale if args.compute_scale is None else args.compute_scale,
                   base.action_ms if args.action_ms is None else args.action_ms,
                   base.message_ms if args.message_ms is None else args.message_ms, device)


def load_steps_arg(spec: str) -> Steps:
    """``--steps FILE|NAME``: measured whole steps, or a CliError saying what is wrong."""
    try:
        return load_steps(spec)
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None


def add_link_arguments(p: argparse.ArgumentParser) -> None:
    """``--link``, ``--bandwidth``, ``--latency-ms``: the link between neighbouring stages."""
    p.add_argument("--link", choices=sorted(LINKS), default=None,
                   help="link preset between stages (default: nvlink on CUDA, else loopback)")
    p.add_argument("--bandwidth", type=bandwidth, default=None, metavar="GBPS",
                   help="link bandwidth in GB/s, or inf for free communication "
                        "(overrides --link)")
    p.add_argument("--latency-ms", type=milliseconds("--latency-ms"), default=None,
                   metavar="MS", help="per-message link latency in ms (overrides --link)")


def add_cost_arguments(p: argparse.ArgumentParser, search: bool = False) -> None:
    """The options every planning command shares (profile, batch, recompute, link, memory);
    with ``search``, recompute and schedule take lists and K and M are not asked."""
    p.add_argument("--profile", required=True, metavar="PATH|NAME",
                   help="a gpipe-profile/1 JSON file, or a shipped profile such as "
                        "h200/gpt2-medium")
    if not search:
        p.add_argument("--stages", "-K", required=True, type=count("--stages"),
                       help="pipeline stages K")
        p.add_argument("--microbatches", "-M", required=True,
                       type=count("--microbatches", high=MAX_MICROBATCHES),
                       help="micro-batches M per step")
    p.add_argument("--global-batch", "-B", required=True,
                   type=count("--global-batch", high=MAX_GLOBAL_BATCH),
                   help="samples per step B (micro-batches of B/M, the first ones larger if "
                        "uneven)")
    if search:
        p.add_argument("--recompute", type=choices("--recompute", RECOMPUTE_MODES),
                       default=list(RECOMPUTE_MODES), metavar="R1,R2",
                       help=f"recompute modes to try (default: {','.join(RECOMPUTE_MODES)})")
        p.add_argument("--schedules", "--schedule", type=choices("--schedules", PLAN_SCHEDULES),
                       default=list(PLAN_SCHEDULES), metavar="S1,S2",
                       help=f"schedules to try, each with the stages per rank it allows "
                            f"(default: all, {','.join(PLAN_SCHEDULES)})")
    else:
        p.add_argument("--recompute", choices=RECOMPUTE_MODES, default="except_last",
                       help="re-materialisation (default: except_last)")
        p.add_argument("--schedule", choices=(*PLAN_SCHEDULES, "auto"), default="gpipe",
                       help="pipeline schedule (default: gpipe, fill-drain; 1f1b; "
                            "interleaved and zbv: several stages per rank; zb-h1 and zbv "
                            "split the backward; synth: synthesised from the stage times; "
                            "auto: the fastest of them all)")
        p.add_argument("--stages-per-rank", "-V", type=count("--stages-per-rank"), default=None,
                       metavar="V", help="stages per rank: the K stages run on K/V ranks "
                                         "(interleaved: V divides K; zbv: 2)")
    p.add_argument("--memory-limit", type=size("--memory-limit"), default=None, metavar="SIZE",
                   help="per-device memory, e.g. 80GiB, or inf (default: the profile's device "
                        "memory)")
    add_link_arguments(p)
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
    p.add_argument("--time-limit", default=time_limit_s, metavar="S", help=help_time,
                   type=number("--time-limit", "a number of seconds > 0 and <= 86400",
                               high=86400.0))


def link_from_args(args: argparse.Namespace, profile: Profile | None = None,
                   base: Link | None = None) -> Link:
    """The link the options give: a preset (``--link``, else ``base``, else the profile's
    device kind's default) with ``--bandwidth`` and ``--latency-ms`` overriding it."""
    if args.link:
        preset = LINKS[args.link]
    elif base is not None:
        preset = base
    else:
        preset = LINKS[default_link(profile.device.kind if profile else "cpu")]
    bandwidth_gbps = preset.bandwidth_gbps if args.bandwidth is None else args.bandwidth
    if args.latency_ms is not None:
        latency = args.latency_ms
    elif math.isinf(bandwidth_gbps) and args.link is None and base is None:
        latency = 0.0  # --bandwidth inf alone means free communication
    else:
        latency = preset.latency_ms
    return Link(bandwidth_gbps, latency)


def load_profile_arg(args: argparse.Namespace, warn_graph: bool = True) -> Profile:
    """``--profile``, with a warning when a graph profile is to be planned as a chain."""
    profile = load_profile(args.profile)
    if profile.edges is not None and warn_graph:
        print(f"warning: profile {profile.model!r} has edges (a graph); planning it as a chain "
              f"in its layer order", file=sys.stderr)
    return profile


def cost_model_from_args(args: argparse.Namespace, profile: Profile,
                         schedule: str | None = None) -> CostModel:
    """The cost model of ``--stages``, ``--microbatches``, ``--schedule`` (or ``schedule``),
    ``--stages-per-rank`` and the shared options. A synthesised schedule is planned as the
    fixed schedule of its placement: zb-h1 for one stage per rank, zbv for two (the V
    shape), interleaved for more."""
    name = args.schedule if schedule is None else schedule
    v = args.stages_per_rank
    if name == SYNTH:
        name = "zb-h1" if v in (None, 1) else "zbv" if v == 2 else "interleaved"
    return CostModel(profile, args.global_batch, args.microbatches, stages=args.stages,
                     recompute=args.recompute, schedule=name,  # type: ignore[arg-type]
                     link=link_from_args(args, profile), optimizer=args.optimizer,
                     runtime=runtime_from_args(args, profile=profile),
                     stages_per_rank=(2 if name == "zbv" else 1) if v is None else v)


def memory_limit_from_args(args: argparse.Namespace, profile: Profile) -> float:
    """``--memory-limit`` if given (inf: none), else the profile's device memory."""
    if args.memory_limit is None:
        return float(profile.device.memory_bytes)
    return math.inf if args.memory_limit >= NO_LIMIT_BYTES else float(args.memory_limit)
