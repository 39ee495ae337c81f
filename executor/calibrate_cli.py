"""``partition-model calibrate``: this machine's link and runtime, as planning options.

    partition-model calibrate --job executor.jobs:translation --profile profile.json -B 16
    torchrun --nproc-per-node 4 -m executor.calibrate_cli --job mypkg.train:job \\
        --profile profile.json -B 64          # on the devices the pipeline will use

Run directly, it spawns two local CPU ranks (gloo): it measures the link between them and
fits the runtime from the exact K=2 plans of the trial M. Under torchrun every rank joins:
the link is measured between ranks 0 and 1 on their devices (``cuda:LOCAL_RANK`` where CUDA
is, NCCL; else the CPU and gloo) and the trial plans have K = the world size. Rank 0 prints
``--bandwidth .. --latency-ms .. --compute-scale .. --action-ms ..`` for ``plan``,
``search`` and ``simulate`` (with ``--json``, the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from partitioner.costs import Link, Runtime
from partitioner.plan import save_plan
from partitioner.profile import Profile, load_profile

from .calibrate import (
    DEFAULT_SIZES,
    check_job,
    fit_link,
    fit_trials,
    measure_link,
    measure_runtime,
    ping_pong,
    run_trials,
    trial_plans,
)
from .launch import under_torchrun

__all__ = ["main"]


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[int]]:
    p = argparse.ArgumentParser(
        prog="partition-model calibrate",
        description="Measure the link between two ranks and fit the executor's runtime from a "
                    "short trial of the job's pipeline; prints the options that make "
                    "plan/search/simulate predict this machine. Run under torchrun to "
                    "calibrate the ranks and devices the pipeline will use.")
    p.add_argument("--job", required=True, metavar="MODULE:FUNCTION",
                   help="the training job (an executor.launch.Job), e.g. "
                        "executor.jobs:translation")
    p.add_argument("--profile", required=True, metavar="PATH|NAME",
                   help="the profile of the job's model (partition-model profile)")
    p.add_argument("--global-batch", "-B", type=int, required=True, help="samples per step")
    p.add_argument("--microbatches", default="1,4",
                   help="M of the trial runs (default 1,4: two micro-batch sizes)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per trial (default 8)")
    p.add_argument("--timeout-s", type=float, default=300.0,
                   help="give up on a silent rank after this long (default 300)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        ms = [int(x) for x in args.microbatches.split(",")]
    except ValueError:
        p.error(f"--microbatches {args.microbatches!r} is not a comma-separated list of whole "
                f"numbers, e.g. 1,4")
    if args.global_batch < 1 or any(not 1 <= m <= args.global_batch for m in ms):
        p.error(f"--microbatches {args.microbatches}: every M must be 1..B (B="
                f"{args.global_batch}); the trial needs a sample per micro-batch")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: time at least one step")
    return args, ms


def _calibrate_world(args: argparse.Namespace, ms: list[int],
                    profile: Profile) -> tuple[Link, Runtime] | None:
    """Every rank: calibrate on this world; rank 0 returns the figures, the others None."""
    cuda = torch.cuda.is_available()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=timedelta(seconds=args.timeout_s))
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        if world < 2:
            raise ValueError("calibrate needs at least two ranks (torchrun --nproc-per-node 2 "
                             "or more); a single rank has no link to measure")
        times = ping_pong(DEFAULT_SIZES, 10, device)
        box: list[Link | None] = [fit_link(DEFAULT_SIZES, times) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        link = box[0]
        assert link is not None
        devices = [f"cuda:{k}" if cuda else "cpu" for k in range(world)]
        trials = trial_plans(profile, args.global_batch, ms, stages=world, link=link,
                             devices=devices)
        with tempfile.TemporaryDirectory(prefix="gpipe-calibrate-") as tmp:
            paths = [str(Path(tmp) / f"trial-{i}.json") for i in range(len(trials))]
            for (_, plan), path in zip(trials, paths, strict=True):
                save_plan(plan, path)
            measured = run_trials(args.job, paths, 2, args.steps, True, device)
        if rank != 0:
            return None
        return link, fit_trials(trials, measured)
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    args, ms = _parse(argv)
    profile = load_profile(args.profile)
    check_job(args.job, profile)
    if under_torchrun():
        figures = _calibrate_world(args, ms, profile)
        if figures is None:
            return 0
        link, runtime = figures
    else:
        link = measure_link(timeout_s=args.timeout_s)
        runtime = measure_runtime(args.job, profile, args.global_batch, link=link,
                                  microbatches=ms, steps=args.steps, timeout_s=args.timeout_s)
    if args.json:
        print(json.dumps({"bandwidth_gbps": link.bandwidth_gbps, "latency_ms": link.latency_ms,
                          "compute_scale": runtime.compute_scale,
                          "action_ms": runtime.action_ms, "message_ms": runtime.message_ms}))
    else:
        print(f"link: {link.bandwidth_gbps:g} GB/s + {link.latency_ms:g} ms per message; "
              f"actions take {runtime.compute_scale:g} x profiled + {runtime.action_ms:g} ms; "
              f"messages arrive {runtime.message_ms:g} ms after their send")
        print(f"--bandwidth {link.bandwidth_gbps:g} --latency-ms {link.latency_ms:g} "
              f"--compute-scale {runtime.compute_scale:g} --action-ms {runtime.action_ms:g} "
              f"--message-ms {runtime.message_ms:g}")
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except ValueError as exc:
        print(f"partition-model calibrate: error: {exc}", file=sys.stderr)
        sys.exit(2)
