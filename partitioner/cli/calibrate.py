"""``partition-model calibrate``: this machine's link and runtime, as planning options.

    $ partition-model calibrate --job executor.workloads.jobs:translation \\
          --profile profile.json -B 16
    $ torchrun --nproc-per-node 4 -m partitioner.cli calibrate --job mypkg.train:job \\
          --profile profile.json -B 64          # on the devices the pipeline will use

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

from partitioner.cli.main import CliError
from partitioner.cli.options import count, count_list, number
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
    p.add_argument("--job", required=True, metavar="MODULE:FUNCTION",
                   help="the training job (a function returning an executor Job), e.g. "
                        "executor.workloads.jobs:translation")
    p.add_argument("--profile", required=True, metavar="PATH|NAME",
                   help="the profile of the job's model (partition-model profile)")
    p.add_argument("--global-batch", "-B", required=True,
                   type=count("--global-batch", high=MAX_GLOBAL_BATCH), help="samples per step")
    p.add_argument("--microbatches", "-M", default=[1, 4],
                   type=count_list("--microbatches", high=MAX_MICROBATCHES),
                   help="M of the trial runs (default 1,4: two micro-batch sizes)")
    p.add_argument("--steps", type=count("--steps", high=10**4), default=8,
                   help="timed steps per trial (default 8)")
    p.add_argument("--timeout-s", type=number("--timeout-s", "a number of seconds > 0 and <= "
                                              "86400", high=86400.0), default=300.0,
                   help="give up on a silent rank after this long (default 300)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
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
