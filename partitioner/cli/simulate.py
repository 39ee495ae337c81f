"""``partition-model simulate``: replay a plan's schedule, with what-if overrides.

    $ partition-model simulate plan.json --devices 1 --png step.png
    $ partition-model simulate plan.json --bandwidth 25 --microbatches 8 --json
    $ partition-model simulate --steps h200/steps/gpt-1.3b --profile h200/gpt-1.3b

With ``--steps`` (measured whole steps, ``gpipe-steps/0``) and no plan it replays each step as
it ran (equal segments on one device, GPipe; ``simulator.devicefit``) under the profile's
device model (``--device-model``) and prints the predicted against the measured step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence

from partitioner.cli.main import CliError
from partitioner.cli.options import (
    add_link_arguments,
    add_runtime_arguments,
    count,
    link_from_args,
    load_steps_arg,
    milliseconds,
    runtime_from_args,
)
from partitioner.formats.assumptions import OPTIMIZERS
from partitioner.formats.plan import MAX_GLOBAL_BATCH, load_plan
from partitioner.formats.timeline import save_chrome_trace
from partitioner.report.gantt import PlotUnavailableError, save_gantt_png
from partitioner.report.plans import simulate_report
from partitioner.schedule.generators import MAX_MICROBATCHES, SCHEDULES
from partitioner.schedule.recompute import RECOMPUTE_MODES
from partitioner.simulator.plans import find_profile, simulate_plan

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model simulate",
        description="Replay a plan's schedule in the simulator and print step time, bubble, "
                    "per-stage busy time and peak memory; options override the plan (what-if).")
    p.add_argument("plan", metavar="PLAN.json", nargs="?", default=None)
    p.add_argument("--steps", default=None, metavar="PATH|NAME",
                   help="instead of a plan: replay these measured whole steps (gpipe-steps/0) "
                        "from --profile and print each against its measurement")
    p.add_argument("--profile", default=None, metavar="PATH|NAME",
                   help="the profile the plan was made from (default: the shipped profile "
                        "of the plan's model, checked by sha256)")
    p.add_argument("--devices", type=count("--devices"), default=None, metavar="N",
                   help="run the K stages on N <= K devices (contiguous blocks; 1: all on one)")
    p.add_argument("--microbatches", "-M", default=None,
                   type=count("--microbatches", high=MAX_MICROBATCHES))
    p.add_argument("--global-batch", "-B", default=None,
                   type=count("--global-batch", high=MAX_GLOBAL_BATCH))
    p.add_argument("--schedule", choices=SCHEDULES, default=None)
    p.add_argument("--stages-per-rank", "-V", type=count("--stages-per-rank"), default=None,
                   metavar="V", help="with --schedule interleaved: V stages per rank")
    p.add_argument("--recompute", choices=RECOMPUTE_MODES, default=None)
    add_link_arguments(p)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    p.add_argument("--optimizer-ms", type=milliseconds("--optimizer-ms"), default=0.0,
                   metavar="MS",
                   help="optimizer step of the whole model, split over stages by parameters")
    add_runtime_arguments(p)
    p.add_argument("--trace", default=None, metavar="OUT.json",
                   help="write the predicted timeline as a Chrome trace (Perfetto)")
    p.add_argument("--png", default=None, metavar="OUT.png", help="write a Gantt chart")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if args.steps is not None:
        return _steps(args)
    if args.plan is None:
        raise CliError("give the plan to replay (PLAN.json), or --steps FILE with --profile")
    plan = load_plan(args.plan)
    profile = find_profile(plan, args.profile)
    res, cm, devices = simulate_plan(
        plan, profile, num_devices=args.devices, global_batch=args.global_batch,
        microbatches=args.microbatches, schedule=args.schedule, recompute=args.recompute,
        stages_per_rank=args.stages_per_rank,
        link=link_from_args(args, base=plan.link), optimizer=args.optimizer,
        optimizer_ms=args.optimizer_ms, runtime=runtime_from_args(args, plan.runtime, profile))
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
        print(simulate_report(plan, cm, res, devices))
    for what, path in (("trace", args.trace), ("Gantt chart", args.png)):
        if path:
            print(f"wrote {what} {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _steps(args: argparse.Namespace) -> int:
    """``--steps``: every measured step against its replay."""
    from partitioner.formats.profile import load_profile
    from partitioner.simulator.devicefit import predict_steps

    if args.plan is not None or args.profile is None:
        raise CliError("--steps replays measured steps from a profile: give --profile, and "
                       "no plan")
    profile, steps = load_profile(args.profile), load_steps_arg(args.steps)
    runtime = runtime_from_args(args, profile=profile)
    fits = predict_steps(profile, steps, runtime.device, runtime)
    if args.json:
        print(json.dumps([{"microbatches": f.step.microbatches, "segments": f.step.segments,
                           "recompute": f.step.recompute, "measured_ms": f.step.step_ms,
                           "predicted_ms": f.predicted_ms, "error": f.error} for f in fits]))
        return 0
    print(f"{steps.model}: {len(fits)} measured steps, B={steps.global_batch}, replayed from "
          f"{args.profile} with " + (runtime.device.describe() if runtime.device else
                                     "no device model (the profile as it is)"))
    print(f"{'M':>4} {'seg':>4} {'rc':>3} {'measured':>9} {'predicted':>9} {'error':>7}")
    for f in fits:
        print(f"{f.step.microbatches:>4} {f.step.segments:>4} "
              f"{'on' if f.step.recompute else '-':>3} {f.step.step_ms:>9.1f} "
              f"{f.predicted_ms:>9.1f} {100 * f.error:>+6.1f}%")
    errors = [abs(f.error) for f in fits]
    print(f"median |error| {100 * statistics.median(errors):.1f}%, largest "
          f"{100 * max(errors):.1f}%")
    return 0
