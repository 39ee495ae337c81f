"""``partition-model calibrate``: this machine's link and runtime, as planning options.

    $ partition-model calibrate --job executor.workloads.jobs:translation \\
          --profile profile.json -B 16
    $ torchrun --nproc-per-node 4 -m partitioner.cli calibrate --job mypkg.train:job \\
          --profile profile.json -B 64          # on the devices the pipeline will use
    $ partition-model calibrate --steps steps.json --profile h200/gpt-1.3b -o device.json

With ``--steps`` (measured whole steps, ``gpipe-steps/0``, as ``tools/gpu_check.py`` writes
them) it fits a GPU's device model instead (``simulator.devicefit``: how a host that runs
ahead of the device turns the profile's alone times into times in a step), prints each step
against its replay, and writes the model for ``--device-model`` (no torch needed).

Run directly, it spawns two local CPU ranks (gloo): it measures the link between them and
fits the runtime from the exact K=2 plans of the trial M. Under torchrun every rank joins:
the link is measured between ranks 0 and 1 on their devices (``cuda:LOCAL_RANK`` where CUDA
is, NCCL; else the CPU and gloo) and the trial plans have K = the world size. Rank 0 prints
``--bandwidth .. --latency-ms .. --compute-scale .. --action-ms ..`` for ``plan``,
``search`` and ``simulate`` (with ``--json``, the figures). The executor (torch) is imported
only when this runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace

from partitioner.cli.main import CliError
from partitioner.cli.options import count, count_list, load_steps_arg, number
from partitioner.formats.plan import MAX_GLOBAL_BATCH
from partitioner.formats.profile import load_profile
from partitioner.schedule.generators import MAX_MICROBATCHES

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model calibrate",
        description="Measure the link between two ranks and fit the executor's runtime from a "
                    "short trial of the job's pipeline; prints the options that make "
                    "plan/search/simulate predict this machine. Run under torchrun to "
                    "calibrate the ranks and devices the pipeline will use.")
    p.add_argument("--output", "-o", metavar="DEVICE.json", default=None,
                   help="with --steps: where to write the fitted device model")
    p.add_argument("--name", default=None, help="with --steps: the device model's name")
    p.add_argument("--job", default=None, metavar="MODULE:FUNCTION",
                   help="the training job (a function returning an executor Job), e.g. "
                        "executor.workloads.jobs:translation")
    p.add_argument("--profile", required=True, metavar="PATH|NAME",
                   help="the profile of the job's model (partition-model profile)")
    p.add_argument("--global-batch", "-B", default=None,
                   type=count("--global-batch", high=MAX_GLOBAL_BATCH), help="samples per step")
    p.add_argument("--microbatches", "-M", default=[1, 4],
                   type=count_list("--microbatches", high=MAX_MICROBATCHES),
                   help="M of the trial runs (default 1,4: two micro-batch sizes)")
    p.add_argument("--steps", default="8", metavar="N|FILE",
                   help="a number: timed steps per trial (default 8); a file (gpipe-steps/0) "
                        "or shipped name of measured whole steps: fit a device model to them "
                        "instead of running a trial (with --output, write it)")
    p.add_argument("--timeout-s", type=number("--timeout-s", "a number of seconds > 0 and <= "
                                              "86400", high=86400.0), default=300.0,
                   help="give up on a silent rank after this long (default 300)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if not args.steps.isdigit():
        return _fit_steps(args)
    try:
        args.steps = count("--steps", high=10**4)(args.steps)
    except argparse.ArgumentTypeError as exc:
        raise CliError(str(exc)) from None
    if args.job is None or args.global_batch is None:
        raise CliError("calibrate needs --job and --global-batch to run a trial (or --steps "
                       "FILE to fit a device model to measured steps)")
    if len(args.microbatches) < 1 or max(args.microbatches) > args.global_batch:
        raise CliError(f"--microbatches {','.join(map(str, args.microbatches))}: every M must "
                       f"be 1..B (B={args.global_batch}); the trial needs a sample per "
                       f"micro-batch")
    profile = load_profile(args.profile)

    from executor.distributed.launch import under_torchrun
    from executor.profiling.calibrate import (
        calibrate_world,
        check_job,
        measure_link,
        measure_runtime,
    )

    check_job(args.job, profile)
    if under_torchrun():
        figures = calibrate_world(args.job, profile, args.global_batch, args.microbatches,
                                  args.steps, args.timeout_s)
        if figures is None:
            return 0
        link, runtime = figures
    else:
        link = measure_link(timeout_s=args.timeout_s)
        runtime = measure_runtime(args.job, profile, args.global_batch, link=link,
                                  microbatches=args.microbatches, steps=args.steps,
                                  timeout_s=args.timeout_s)
    if args.json:
        print(json.dumps({"bandwidth_gbps": link.bandwidth_gbps, "latency_ms": link.latency_ms,
                          "compute_scale": runtime.compute_scale,
                          "action_ms": runtime.action_ms, "message_ms": runtime.message_ms}))
    else:
        print(f"link: {link.describe()} per message; actions take {runtime.compute_scale:g} x "
              f"profiled + {runtime.action_ms:g} ms; messages arrive {runtime.message_ms:g} ms "
              f"after their send")
        print(f"--bandwidth {link.bandwidth_gbps:g} --latency-ms {link.latency_ms:g} "
              f"--compute-scale {runtime.compute_scale:g} --action-ms {runtime.action_ms:g} "
              f"--message-ms {runtime.message_ms:g}")
    return 0


def _fit_steps(args: argparse.Namespace) -> int:
    """``--steps``: fit, print the replays against the measurements, write the model."""
    from partitioner.formats.device import device_model_for, save_device_model
    from partitioner.simulator.devicefit import fit_device_model, predict_steps

    if args.job is not None:
        raise CliError("--steps fits a device model from measurements; it runs no --job (give "
                       "one or the other)")
    profile, steps = load_profile(args.profile), load_steps_arg(args.steps)
    start = device_model_for(profile.device.name, profile.device.kind)  # its peaks and names
    name = args.name or (start.name if start else profile.device.name.lower().replace(" ", "-"))
    dm = fit_device_model(profile, steps, start, name=name)
    fits = predict_steps(profile, steps, dm)
    before = predict_steps(profile, steps, None)
    rows = [{"microbatches": f.step.microbatches, "segments": f.step.segments,
             "recompute": f.step.recompute, "measured_ms": f.step.step_ms,
             "predicted_ms": f.predicted_ms, "error": f.error, "uncalibrated_error": u.error}
            for f, u in zip(fits, before, strict=True)]
    worst = max(abs(r["error"]) for r in rows)
    dm = replace(dm, device_names=dm.device_names or (profile.device.name,),
                 fit=(("steps", args.steps), ("profile", args.profile),
                      ("max_abs_error", worst), ("rows", rows)))
    if args.json:
        print(json.dumps({"device_model": dm.name, "figures": {
            k: getattr(dm, k) for k in ("host_forward", "host_backward", "host_recompute",
                                        "device_scale", "small_work_exponent")},
            "steps": rows}))
    else:
        print(dm.describe())
        print(f"{'M':>4} {'seg':>4} {'rc':>3} {'measured':>9} {'predicted':>9} {'error':>7} "
              f"{'uncal.':>7}")
        for r in rows:
            print(f"{r['microbatches']:>4} {r['segments']:>4} {'on' if r['recompute'] else '-':>3}"
                  f" {r['measured_ms']:>9.1f} {r['predicted_ms']:>9.1f} {100 * r['error']:>+6.1f}%"
                  f" {100 * r['uncalibrated_error']:>+6.1f}%")
        print(f"largest |error| {100 * worst:.1f}%")
    if args.output:
        save_device_model(dm, args.output)
        if not args.json:
            print(f"wrote {args.output}; use it with --device-model {args.output}")
    return 0
