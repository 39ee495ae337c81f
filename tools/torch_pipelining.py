"""torch.distributed.pipelining's training step time on 2 gloo ranks of one thread each.

    PYTHONPATH=. python tools/torch_pipelining.py --schedule Schedule1F1B -M 8
    PYTHONPATH=. python tools/torch_pipelining.py --schedule ScheduleZBVZeroBubble -M 8
    PYTHONPATH=. python tools/torch_pipelining.py --plan plan.json   # our plan, run by torch

For the benchmarks (tools/bench_executor.py's model and batch by default): ``median_step_ms``
runs a list of stage modules under one of torch's schedule classes (``SCHEDULES``) or under
torch's runtime loading our exported CSV (``CSV``; ``partitioner.schedule.torchcsv``), and
returns the median step time; ``torch_default_ms`` is what torch users get by default:
ScheduleGPipe on equal numbers of whole blocks per stage (``equal_block_cuts``). Stage k runs
on the rank torch's class puts it (one stage per rank; interleaved: k mod R; ZB-V: the V, rank
r holding r and 2R-1-r) or, for a CSV, the rank whose row holds its actions. A step is
``zero_grad``, torch's ``schedule.step`` and an SGD step, between two barriers; one warm-up
step first. Every rank keeps its freed memory (executor.runtime.allocator), as the project's
runner does, so that both runtimes run under the same allocator.

    >>> equal_block_cuts(blocks=8, stages=2), equal_block_cuts(blocks=8, stages=4)
    ([0, 9, 18], [0, 5, 9, 13, 18])
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from torch import nn

from executor.distributed.spawn import spawn_local
from executor.runtime.allocator import keep_freed_memory
from partitioner.schedule.torchcsv import from_torch_csv

__all__ = ["CSV", "RANKS", "SCHEDULES", "equal_block_cuts", "equal_block_split",
           "median_step_ms", "placement", "rank_step_times", "split", "torch_default_ms"]

#: torch's schedule classes this helper runs, and how many stages each puts on a rank
#: (None: any number, stage k on rank k mod R).
SCHEDULES: dict[str, int | None] = {
    "ScheduleGPipe": 1, "Schedule1F1B": 1, "ScheduleInterleaved1F1B": None,
    "ScheduleInterleavedZeroBubble": None, "ScheduleZBVZeroBubble": 2}
#: The schedule name that means: torch's runtime loading a compute-only CSV (ours, exported).
CSV = "csv"
RANKS = 2

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def equal_block_cuts(blocks: int, stages: int, layers_per_block: int = 2) -> list[int]:
    """Cut points of torch users' default split of [embedding, blocks x layers_per_block
    layers, head]: whole blocks, as equal in number as they go (the first stages take one more
    when K does not divide them), the embedding with the first, the head with the last."""
    if not 1 <= stages <= blocks:
        raise ValueError(f"cannot split {blocks} blocks into K={stages} stages of whole "
                         f"blocks; need 1 <= K <= {blocks}")
    per, extra = divmod(blocks, stages)
    cuts, done = [0], 0
    for k in range(stages):
        done += per + (k < extra)
        cuts.append(1 + layers_per_block * done)
    cuts[-1] += 1  # the head
    return cuts


def split(model: nn.Sequential, cuts: Sequence[int]) -> list[nn.Module]:
    """Stage k: layers [cuts[k], cuts[k+1]) of ``model`` (its own modules, names kept)."""
    if cuts[0] != 0 or cuts[-1] != len(model) or any(b <= a for a, b in itertools.pairwise(cuts)):
        raise ValueError(f"cuts {list(cuts)} must rise strictly from 0 to the model's "
                         f"{len(model)} layers, e.g. [0, {len(model) // 2}, {len(model)}]")
    return [model[a:b] for a, b in itertools.pairwise(cuts)]


def equal_block_split(model: nn.Sequential, blocks: int, stages: int = RANKS,
                      layers_per_block: int = 2) -> list[nn.Module]:
    """``model`` split as ``equal_block_cuts`` says."""
    cuts = equal_block_cuts(blocks, stages, layers_per_block)
    if cuts[-1] != len(model):
        raise ValueError(f"{blocks} blocks of {layers_per_block} layers plus embedding and "
                         f"head make {cuts[-1]} layers, but the model has {len(model)}")
    return split(model, cuts)


def placement(schedule: str, stages: int, csv: str | None = None,
              ranks: int = RANKS) -> tuple[int, ...]:
    """The rank of each of K stages under ``schedule`` (ValueError if it cannot place K)."""
    if schedule == CSV:
        if csv is None:
            raise ValueError("schedule 'csv' needs the CSV text (partition-model "
                             "export-schedule PLAN --format torch-csv)")
        sched = from_torch_csv(csv)
        if (sched.stages, sched.ranks) != (stages, ranks):
            raise ValueError(f"the CSV has K={sched.stages} stages on {sched.ranks} ranks; "
                             f"give {sched.stages} stage modules and run {sched.ranks} ranks")
        return sched.rank_of
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join([*SCHEDULES, CSV])}")
    per_rank = SCHEDULES[schedule]
    if stages % ranks or (per_rank is not None and stages != per_rank * ranks):
        want = f"{per_rank * ranks}" if per_rank else f"a multiple of {ranks}"
        raise ValueError(f"{schedule} on {ranks} ranks runs {want} stages, not K={stages}")
    if schedule == "ScheduleZBVZeroBubble":
        return tuple(k if k < ranks else 2 * ranks - 1 - k for k in range(stages))
    return tuple(k % ranks for k in range(stages))


def _make(schedule: str, stages: list[Any], m: int, loss_fn: LossFn, csv: str | None) -> Any:
    import torch.distributed.pipelining as pp
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    if schedule != CSV:
        cls = getattr(pp, schedule)
        return cls(stages[0] if SCHEDULES[schedule] == 1 else stages, n_microbatches=m,
                   loss_fn=loss_fn)
    runtime = _PipelineScheduleRuntime(stages, n_microbatches=m,  # type: ignore[no-untyped-call]
                                       loss_fn=loss_fn)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "schedule.csv"
        path.write_text(csv or "")
        runtime._load_csv(str(path))
    return runtime


def rank_step_times(modules: list[nn.Module], schedule: str, m: int,
                    batch: tuple[torch.Tensor, ...], loss_fn: LossFn, csv: str | None,
                    steps: int) -> list[float]:
    """On one rank: its stages, ``steps`` timed steps after one warm-up; seconds each."""
    from torch.distributed.pipelining import PipelineStage

    keep_freed_memory()
    rank, big_k = dist.get_rank(), len(modules)
    mine = [k for k, r in enumerate(placement(schedule, big_k, csv, dist.get_world_size()))
            if r == rank]
    parts = [copy.deepcopy(modules[k]) for k in mine]  # private memory, not the parent's
    stages = [PipelineStage(part, k, big_k, torch.device("cpu")) for k, part in
              zip(mine, parts, strict=True)]
    sched = _make(schedule, stages, m, loss_fn, csv)
    opt = torch.optim.SGD([p for part in parts for p in part.parameters()], lr=1e-3)
    x, y = batch
    times = []
    for i in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        sched.step(*([x] if 0 in mine else []),
                   **({"target": y, "losses": []} if big_k - 1 in mine else {}))
        opt.step()
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def median_step_ms(stages: Sequence[nn.Module], schedule: str, microbatches: int,
                   batch: tuple[torch.Tensor, torch.Tensor], loss_fn: LossFn, *,
                   csv: str | None = None, steps: int = 5, timeout_s: float = 600) -> float:
    """Median ms of ``steps`` training steps of ``stages`` (K modules, stage k's input the
    output of stage k-1) under torch's ``schedule`` (a name of ``SCHEDULES``, or ``CSV`` with
    the ``csv`` text) with M micro-batches, on 2 local gloo ranks of one thread each.
    ``batch`` is (input, target), ``loss_fn(output, target)`` a module-level function."""
    placement(schedule, len(stages), csv)  # refuse before any process starts
    if csv is not None and from_torch_csv(csv).microbatches != microbatches:
        raise ValueError(f"the CSV schedules M={from_torch_csv(csv).microbatches} "
                         f"micro-batches, not M={microbatches}")
    b = batch[0].shape[0]
    if microbatches < 1 or b % microbatches:
        raise ValueError(f"batch of {b} cannot go into M={microbatches} equal micro-batches; "
                         f"torch's stages infer every message's shape from micro-batch 0")
    times = spawn_local(rank_step_times, RANKS, (list(stages), schedule, microbatches, batch,
                                                 loss_fn, csv, steps),
                        threads=1, timeout_s=timeout_s)
    return float(statistics.median(times[0])) * 1e3


def torch_default_ms(model: nn.Sequential, blocks: int, microbatches: int,
                     batch: tuple[torch.Tensor, torch.Tensor], loss_fn: LossFn, *,
                     steps: int = 5, layers_per_block: int = 2) -> float:
    """torch users' default: ScheduleGPipe on ``equal_block_split`` over the 2 ranks."""
    return median_step_ms(equal_block_split(model, blocks, RANKS, layers_per_block),
                          "ScheduleGPipe", microbatches, batch, loss_fn, steps=steps)


def main() -> None:
    import bench_executor as bench  # the benchmark's GPT, batch and loss

    from executor.workloads.models import lm_loss
    from partitioner.cli.export import torch_problems
    from partitioner.formats.plan import load_plan
    from partitioner.schedule.torchcsv import to_torch_csv

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedule", choices=[*SCHEDULES, CSV], default="ScheduleGPipe")
    p.add_argument("-M", "--microbatches", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    p.add_argument("--cuts", default=None, metavar="0,9,18",
                   help="stage boundaries in layers (default: equal whole blocks, K = 2, or "
                        "4 for the multi-stage classes)")
    p.add_argument("--csv", default=None, metavar="FILE",
                   help="with --schedule csv: a compute-only CSV (export-schedule)")
    p.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="run this plan's stages and schedule under torch (implies csv)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, batch = bench.build(), bench.batch()
    csv, schedule, m, label = None, args.schedule, args.microbatches, args.schedule
    if args.plan:
        plan = load_plan(args.plan)
        problems = torch_problems(plan)
        if problems:
            sys.exit(f"torch cannot run {args.plan}: " + "; ".join(problems))
        schedule, m, csv = CSV, plan.microbatches, to_torch_csv(plan.build_schedule())
        label = f"{args.plan} ({plan.schedule}, as CSV)"
        cuts = [r[0] for r in plan.layer_ranges()] + [plan.layer_ranges()[-1][1]]
    elif schedule == CSV:
        if not args.csv:
            sys.exit("--schedule csv needs --csv FILE (or --plan PLAN.json)")
        csv, label = Path(args.csv).read_text(), f"{args.csv} (CSV)"
    if not args.plan:
        stages = from_torch_csv(csv).stages if csv else (
            RANKS * (SCHEDULES[schedule] or 2))
        cuts = ([int(c) for c in args.cuts.split(",")] if args.cuts else
                equal_block_cuts(bench.BLOCKS, stages))
    ms = median_step_ms(split(model, cuts), schedule, m, batch, lm_loss, csv=csv,
                        steps=args.steps)
    print(f"{label} K={len(cuts) - 1} cuts={cuts} M={m} B={bench.BATCH}: median step "
          f"{ms:.1f} ms over {args.steps} steps ({bench.BATCH / ms * 1e3:.1f} samples/s)")


if __name__ == "__main__":
    main()
