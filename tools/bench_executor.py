"""Executor throughput on this machine: the project's pipeline against one process and against
torch.distributed.pipelining, the same training work side by side in one run.

    PYTHONPATH=. python tools/bench_executor.py            # about 3 minutes on 2 cores

Workload: a GPT (embedding, 8 pre-LN blocks, d=256, 4 heads, 128 tokens, vocab 4096, final
LayerNorm + LM head; executor.models.gpt), batch B=32, one SGD step per training step.
Systems, interleaved over several rounds; each figure is the fastest step's samples per second
(other processes on a shared machine only ever slow a step down):

- single: one process, one thread, the whole batch;
- ours: K=2 ranks (one thread each), the plan the project makes from its own profile of this
  model on this machine (executor.profiler.profile_model + partitioner.make_plan);
- torch-default: torch.distributed.pipelining's ScheduleGPipe on the split its users make by
  default (equal numbers of blocks per stage, embedding first, head last);
- torch-our-split: the same ScheduleGPipe on the project's split (runtime against runtime).

The profile times layers only; the loss (cross-entropy over the vocabulary) runs on the last
stage too, so its measured time is added to the last layer before planning. The last line is
``speedup_vs_single=X ratio_vs_torch_pipelining=Y ratio_same_split=Z``, each at the best M of
each system (goals: X >= 1.8, Y >= 1.15, Z >= 1.0).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from torch import nn

from executor.distributed import DistributedRunner
from executor.models import gpt, lm_loss
from executor.profiler import profile_model
from executor.spawn import spawn_local
from partitioner import LINKS, CostModel, make_plan
from partitioner.plan import Plan
from partitioner.profile import LayerProfile, Profile

VOCAB, SEQ, WIDTH, HEADS, BLOCKS, BATCH, K = 4096, 128, 256, 4, 8, 32, 2
MICROBATCHES = (1, 2, 4, 8, 16)
SIZES = sorted({BATCH // m for m in MICROBATCHES})


def build() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return gpt(VOCAB, SEQ, WIDTH, HEADS, BLOCKS)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    stream = torch.randint(VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()


def loss_ms(sizes: list[int], repeat: int) -> list[tuple[float, float]]:
    """Median forward and backward time of the loss alone, per micro-batch size (thread CPU
    time, like the profile: other processes on the machine do not count)."""
    out = []
    for b in sizes:
        logits = torch.randn(b, SEQ, VOCAB, requires_grad=True)
        target = batch()[1][:b]
        fwd, bwd = [], []
        for _ in range(repeat + 1):
            t0 = time.thread_time()
            loss = lm_loss(logits, target)
            t1 = time.thread_time()
            loss.backward()
            fwd.append(t1 - t0)
            bwd.append(time.thread_time() - t1)
        out.append((statistics.median(fwd[1:]) * 1e3, statistics.median(bwd[1:]) * 1e3))
    return out


def with_loss(profile: Profile, extra: list[tuple[float, float]]) -> Profile:
    """The profile with the loss's time added to the last layer (it runs on the last stage)."""
    last = profile.layers[-1]
    head = dataclasses.replace(
        last, fwd_ms=tuple(f + e[0] for f, e in zip(last.fwd_ms, extra, strict=True)),
        bwd_ms=tuple(b + e[1] for b, e in zip(last.bwd_ms, extra, strict=True)))
    layers: tuple[LayerProfile, ...] = (*profile.layers[:-1], head)
    return dataclasses.replace(profile, layers=layers)


def timed(step: Callable[[], None], steps: int, sync: Callable[[], None]) -> list[float]:
    """Seconds of each of ``steps`` steps after one warm-up, each between two
    synchronisations of the ranks."""
    times = []
    for i in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def _single(steps: int) -> list[float]:
    model, (x, y) = build(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        lm_loss(model(x), y).backward()
        opt.step()
    return timed(step, steps, lambda: None)


def _ours(plan: Plan, steps: int) -> list[float]:
    runner = DistributedRunner(build(), plan)
    opt = torch.optim.SGD(runner.parameters(), lr=1e-3)
    x, y = batch()

    def step() -> None:
        opt.zero_grad()
        runner.train_step(x, y, lm_loss)
        opt.step()
    return timed(step, steps, dist.barrier)


def _torch(cut: int, m: int, steps: int) -> list[float]:
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    rank, model = dist.get_rank(), build()
    part = nn.Sequential(*(model[i] for i in (range(cut) if rank == 0 else
                                               range(cut, len(model)))))
    stage = PipelineStage(part, rank, K, torch.device("cpu"))
    schedule = ScheduleGPipe(stage, n_microbatches=m, loss_fn=lm_loss)
    opt = torch.optim.SGD(part.parameters(), lr=1e-3)
    x, y = batch()

    def step() -> None:
        opt.zero_grad()
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=[])
        opt.step()
    return timed(step, steps, dist.barrier)


def ranks_main(plans: dict[int, Plan], default_cut: int, steps: int,
               rounds: int) -> dict[Any, list[float]]:
    """On each of the K ranks: every system at every M, interleaved, ``rounds`` times, so a
    burst of load from elsewhere hits all systems alike. The single-process baseline runs on
    rank 0 while the other ranks wait."""
    out: dict[Any, list[float]] = {}
    for _ in range(rounds):
        for m, plan in plans.items():
            our_cut = plan.stages[0].layers[1]
            out.setdefault(("ours", m), []).extend(_ours(plan, steps))
            out.setdefault(("torch-default", m), []).extend(_torch(default_cut, m, steps))
            out.setdefault(("torch-our-split", m), []).extend(_torch(our_cut, m, steps))
        if dist.get_rank() == 0:
            out.setdefault(("single", 1), []).extend(_single(steps))
        dist.barrier()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="timed steps per system, M and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all systems and M")
    p.add_argument("--repeat", type=int, default=3, help="profiler repetitions per layer")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          f"torch {torch.__version__}")
    torch.set_num_threads(1)
    model, (x, _) = build(), batch()
    t0 = time.perf_counter()
    profile = profile_model(model, x, SIZES, "cpu", threads=1, warmup=1, repeat=args.repeat,
                            clock="thread", name="bench-gpt")
    profile = with_loss(profile, loss_ms(SIZES, args.repeat))
    print(f"profiled {profile.num_layers} layers at b={SIZES} in "
          f"{time.perf_counter() - t0:.0f} s")
    plans = {m: make_plan(CostModel(profile, BATCH, m, stages=K, recompute="never",
                                    link=LINKS["loopback"], optimizer="sgd"),
                          devices=["cpu"] * K) for m in MICROBATCHES}
    default_cut = 1 + BLOCKS // 2  # embedding + half the blocks | the rest + head
    times = spawn_local(ranks_main, K, (plans, default_cut, args.steps, args.rounds),
                        threads=1, timeout_s=600)[0]
    # the fastest step of each: load from other processes only ever slows a step down
    base = min(times["single", 1])
    rate = {name: {m: BATCH / min(times[name, m]) for m in MICROBATCHES}
            for name in ("ours", "torch-default", "torch-our-split")}
    print(f"\n{'system':<16} {'split':<10}" + "".join(f"{'M=' + str(m):>9}"
                                                    for m in MICROBATCHES) + "   (samples/s)")
    print(f"{'single':<16} {'-':<10}" + f"{BATCH / base:>9.1f}" + " " * 9 * 4)
    for name, r in rate.items():
        split = (f"{default_cut}|{len(model) - default_cut}" if name == "torch-default"
                 else "/".join(sorted({f"{pl.stages[0].layers[1]}|"
                                       f"{len(model) - pl.stages[0].layers[1]}"
                                       for pl in plans.values()})))
        print(f"{name:<16} {split:<10}" + "".join(f"{r[m]:>9.1f}" for m in MICROBATCHES))
    best = {name: max(r.values()) for name, r in rate.items()}
    print(f"\nsplits: layers [0, cut) | [cut, {len(model)}); layer 0 is the embedding, "
          f"{len(model) - 1} the head; load average now {os.getloadavg()[0]:.2f}")
    print(f"speedup_vs_single={best['ours'] * base / BATCH:.2f} "
          f"ratio_vs_torch_pipelining={best['ours'] / best['torch-default']:.2f} "
          f"ratio_same_split={best['ours'] / best['torch-our-split']:.2f}")


if __name__ == "__main__":
    main()
