"""``partition-model run``: train a plan with one rank per row of its schedule and replica.

    $ partition-model run --job executor.workloads.jobs:translation --plan plan.json \\
          --steps 30 --trace measured.json --metrics steps.jsonl   # R x D local CPU ranks
    $ torchrun --nproc-per-node 4 -m partitioner.cli run --job mypkg.train:job \\
          --plan plan.json --steps 100              # one rank per GPU or node

The executor (torch) is imported only when this runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from partitioner.cli.options import count, number

__all__ = ["DEFAULT_JOB", "main"]

DEFAULT_JOB = "executor.workloads.jobs:demo"


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model run",
        description="Train a gpipe-plan/1 plan with one rank per row of its schedule (R = K / V "
                    "ranks for V stages per rank) in each of its D replicas. Under torchrun "
                    "each process runs its row; run directly, it spawns R x D local CPU ranks.")
    p.add_argument("--job", default=DEFAULT_JOB, metavar="MODULE:FUNCTION",
                   help="function returning an executor Job (default: a demo MLP)")
    p.add_argument("--plan", required=True, help="plan file (gpipe-plan/1 JSON)")
    p.add_argument("--steps", type=count("--steps", high=10**9), default=10,
                   help="training steps (default 10)")
    p.add_argument("--trace", default=None, metavar="TRACE.json",
                   help="write a measured timeline (Chrome trace) from rank 0: of the last "
                        "5 steps, the one of median length")
    p.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK with CUDA, else cpu), plan (the plan's), or a "
                        "device for every rank")
    p.add_argument("--timeout-s", type=number("--timeout-s", "a number of seconds > 0 and <= "
                                              "86400", high=86400.0), default=60.0,
                   help="give up on a silent peer after this long (default 60)")
    p.add_argument("--threads", type=count("--threads", high=1024), default=1,
                   help="torch threads per rank when spawning local ranks (default 1)")
    p.add_argument("--keep-freed-memory", choices=("on", "off"), default="on",
                   help="on the CPU, keep freed memory for reuse between steps (glibc malloc "
                        "settings, process-wide; default on)")
    p.add_argument("--metrics", default=None, metavar="FILE.jsonl",
                   help="write one JSON line per step (step, loss, step_ms, pipeline_ms, "
                        "samples), from the rank of replica 0's last stage")
    p.add_argument("--shard-optimizer", choices=("on", "off"), default=None,
                   help="ZeRO-1: each of a stage's D replicas keeps the optimizer state of "
                        "1/D of its parameters (default: as the plan says)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="save a checkpoint under DIR/step-N (every rank its own part, under "
                        "the model's parameter names: any plan can resume it)")
    p.add_argument("--checkpoint-every", type=count("--checkpoint-every", high=10**9),
                   default=None, metavar="N",
                   help="with --checkpoint-dir: every N steps (default: at the end only)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from a checkpoint (or the newest in a --checkpoint-dir), "
                        "under this plan or another; --steps counts from the run's start")
    p.add_argument("--progress", action="store_true",
                   help="show a progress bar with the loss instead of a line per step")
    args = p.parse_args(argv)
    if args.checkpoint_every is not None and args.checkpoint_dir is None:
        p.error(f"--checkpoint-every {args.checkpoint_every} needs --checkpoint-dir DIR "
                f"(where to save)")

    from executor.distributed.launch import Checkpointing, launch, under_torchrun

    checkpoint = Checkpointing(args.checkpoint_dir, args.checkpoint_every or args.steps,
                               args.resume)

    summaries = launch(args.job, args.plan, args.steps, trace=args.trace, device=args.device,
                       timeout_s=args.timeout_s, threads=args.threads, progress=args.progress,
                       keep_memory=args.keep_freed_memory == "on", metrics=args.metrics,
                       shard_optimizer=None if args.shard_optimizer is None
                       else args.shard_optimizer == "on", checkpoint=checkpoint)
    if under_torchrun():
        return 0
    last = next((s for s in reversed(summaries) if s["losses"]), None)  # of the last stage
    if last is None:  # resumed at or past --steps
        print(f"nothing to train: the checkpoint is at or past --steps {args.steps}")
        return 0
    mean_ms = sum(last["step_ms"]) / len(last["step_ms"])
    first = last.get("first_step", 0)
    done = f"steps {first}..{args.steps - 1}" if first else f"{args.steps} steps"
    print(f"trained {done} on {len(summaries)} local ranks: loss "
          f"{last['losses'][0]:.5f} -> {last['losses'][-1]:.5f}, {mean_ms:.1f} ms per step")
    return 0
