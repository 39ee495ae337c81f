"""Executor throughput on this machine: the project's pipeline against one process and against
torch.distributed.pipelining, the same training work side by side in one run.

    PYTHONPATH=. python tools/bench_executor.py            # about 10 minutes on 2 cores

Workload: a GPT (embedding, 8 pre-LN blocks, d=256, 4 heads, 128 tokens, vocab 4096, final
LayerNorm + LM head; executor.workloads.models.gpt), batch B=32, one SGD step per training step. Every
system runs the same model, as an nn.Sequential of 18 layers: the embedding, each block as its
two residual halves (x + attn(ln1(x)), then x + mlp(ln2(x)): the block's own modules and
arithmetic), the head. A pipeline may so cut between the halves of a block.
Systems, interleaved over several rounds; each figure is the fastest step's samples per second
(other processes on a shared machine only ever slow a step down):

- single: one process, one thread, the whole batch;
- single-M: the same step in one process as M micro-batches one after another (the work the
  pipeline shares out), and balanced-bound: what K ranks could reach on that work with stages
  of exactly equal work, free messages and GPipe's bubble, (M+K-1)/M x work/K per step;
- ours: 2 ranks (one thread each), the plan the project makes from its own profile of this
  model on this machine (executor.profiling.profiler.profile_model + partitioner.make_plan), run with
  each of the project's schedules: gpipe, 1f1b and zb-h1 on K=2 stages; interleaved and zbv on
  K=4 stages, two per rank; synth, the schedule synthesised for the zb-h1 partition's measured
  stage times (1F1B keeps fewer micro-batches in flight, which on a CPU also means
  activations still in cache when their backward comes);
- torch-default: torch.distributed.pipelining's ScheduleGPipe on the split its users make by
  default (equal numbers of whole blocks per stage, embedding first, head last);
- torch-our-split: the same ScheduleGPipe on the project's split (runtime against runtime);
- torch-1f1b, torch-interleaved, torch-izb, torch-zbv: torch's Schedule1F1B on our K=2 split and
  its ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble and ScheduleZBVZeroBubble on our
  K=4 split (tools/torch_pipelining.py).

The profile times layers only; the loss (cross-entropy over the vocabulary) runs on the last
stage too, so its measured time is added to the last layer before planning. The last line is
``best_schedule=NAME speedup_vs_single=X ratio_vs_torch_best=Y ratio_vs_torch_default=Z``,
each at the best M of each system: ours at its best schedule, Y against the fastest torch
schedule of any kind on our split, Z against torch's ScheduleGPipe on its default split
(goals: X >= 1.80, Y >= 1.05, Z >= 1.15); the line before gives the ratios for ours with GPipe
alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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
from torch_pipelining import rank_step_times

from executor.distributed.runner import DistributedRunner
from executor.distributed.spawn import spawn_local
from executor.profiling.profiler import profile_model
from executor.runtime.allocator import keep_freed_memory
from executor.workloads.models import gpt, lm_loss
from partitioner import LINKS, CostModel, make_plan
from partitioner.formats.plan import Plan
from partitioner.formats.profile import LayerProfile, Profile

VOCAB, SEQ, WIDTH, HEADS, BLOCKS, BATCH, K = 4096, 128, 256, 4, 8, 32, 2
MICROBATCHES = (1, 2, 4, 8, 16)
#: Our schedules: (name, stages K on the 2 ranks); synth is made for zb-h1's partition.
SCHEDULES = (("gpipe", 2), ("1f1b", 2), ("zb-h1", 2), ("interleaved", 4), ("zbv", 4),
             ("synth", 2))
#: torch's schedules on our split: (row name, torch class, stages K).
TORCH = (("torch-our-split", "ScheduleGPipe", 2), ("torch-1f1b", "Schedule1F1B", 2),
         ("torch-interleaved", "ScheduleInterleaved1F1B", 4),
         ("torch-izb", "ScheduleInterleavedZeroBubble", 4),
         ("torch-zbv", "ScheduleZBVZeroBubble", 4))
SIZES = sorted({BATCH // m for m in MICROBATCHES})


class Residual(nn.Module):
    """x + body(norm(x)): one half of a pre-LN block."""

    def __init__(self, norm: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.norm, self.body = norm, body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(self.norm(x))
        return out


def build() -> nn.Sequential:
    """executor.workloads.models.gpt with each block as its two halves (same modules, same arithmetic)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        blocks = gpt(VOCAB, SEQ, WIDTH, HEADS, BLOCKS)
    layers: list[nn.Module] = [blocks[0]]
    for block in list(blocks)[1:-1]:
        layers += [Residual(block.ln1, block.attn), Residual(block.ln2, block.mlp)]
    return nn.Sequential(*layers, blocks[-1])


def describe(cut: int) -> str:
    """A cut of the 18-layer model in blocks: layers [0, cut) hold the embedding and
    (cut - 1) / 2 blocks."""
    return f"{cut}: emb+{(cut - 1) / 2:g} blocks"


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

    def plus(ms: tuple[float, ...] | None, j: int) -> tuple[float, ...] | None:
        return None if ms is None else tuple(x + e[j] for x, e in zip(ms, extra, strict=True))
    head = dataclasses.replace(  # the loss's backward is input-gradient work: I, not W
        last, fwd_ms=plus(last.fwd_ms, 0), bwd_ms=plus(last.bwd_ms, 1),
        bwd_input_ms=plus(last.bwd_input_ms, 1))
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


def _single(steps: int, m: int = 1) -> list[float]:
    """One process, one thread: the whole batch (m=1), or the same step as ``m``
    micro-batches one after another (the work a pipeline shares out, without the pipeline)."""
    model, (x, y) = build(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    b = BATCH // m

    def step() -> None:
        opt.zero_grad()
        for i in range(m):
            (lm_loss(model(x[i * b:(i + 1) * b]), y[i * b:(i + 1) * b]) / m).backward()
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


def _torch(cuts: list[int], schedule: str, m: int, steps: int) -> list[float]:
    """torch.distributed.pipelining's ``schedule`` on the stages [cuts[k], cuts[k+1])."""
    model = build()
    stages: list[nn.Module] = [nn.Sequential(*(model[i] for i in range(a, b)))
                               for a, b in itertools.pairwise(cuts)]
    return rank_step_times(stages, schedule, m, batch(), lm_loss, None, steps)


def _cuts(plan: Plan) -> list[int]:
    return [s.layers[0] for s in plan.stages] + [plan.stages[-1].layers[1]]


def ranks_main(plans: dict[tuple[str, int], Plan], default_cut: int, steps: int,
               rounds: int) -> dict[Any, list[float]]:
    """On each of the K ranks: every system at every M, interleaved, ``rounds`` times, so a
    burst of load from elsewhere hits all systems alike. The single-process baseline runs on
    rank 0 while the other ranks wait. Every process keeps its freed memory for the next step
    (executor.runtime.allocator), as `partition-model run` does by default."""
    keep_freed_memory()
    out: dict[Any, list[float]] = {}
    for _ in range(rounds):
        for m in MICROBATCHES:
            for schedule, _ in SCHEDULES:
                out.setdefault((f"ours-{schedule}", m), []).extend(
                    _ours(plans[schedule, m], steps))
            out.setdefault(("torch-default", m), []).extend(
                _torch([0, default_cut, 2 * BLOCKS + 2], "ScheduleGPipe", m, steps))
            for name, cls, stages in TORCH:
                if m < stages and cls != "ScheduleGPipe":
                    continue  # torch's other schedules need at least one micro-batch per stage
                split = _cuts(plans["gpipe" if stages == 2 else "interleaved", m])
                out.setdefault((name, m), []).extend(_torch(split, cls, m, steps))
        if dist.get_rank() == 0:
            for m in MICROBATCHES:
                out.setdefault(("single", m), []).extend(_single(steps, m))
        dist.barrier()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="timed steps per system, M and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all systems and M")
    p.add_argument("--repeat", type=int, default=3, help="profiler repetitions per layer")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          f"torch {torch.__version__}")
    torch.set_num_threads(1)
    keep_freed_memory()  # the profile is taken under the allocator the ranks run with
    model, (x, _) = build(), batch()
    t0 = time.perf_counter()
    profile = profile_model(model, x, SIZES, "cpu", threads=1, warmup=1, repeat=args.repeat,
                            clock="thread", name="bench-gpt")
    profile = with_loss(profile, loss_ms(SIZES, args.repeat))
    print(f"profiled {profile.num_layers} layers at b={SIZES} in "
          f"{time.perf_counter() - t0:.0f} s")
    plans = {(sched, m): make_plan(
        CostModel(profile, BATCH, m, stages=stages, recompute="never",
                  schedule="zb-h1" if sched == "synth" else sched,  # type: ignore[arg-type]
                  link=LINKS["loopback"], optimizer="sgd",
                  stages_per_rank=stages // K),
        devices=["cpu"] * stages, synthesise=sched == "synth")
        for sched, stages in SCHEDULES for m in MICROBATCHES}
    for m in MICROBATCHES:
        predicted = {sched: plans[sched, m].predicted for sched, _ in SCHEDULES}
        print(f"M={m} predicted ms: " + ", ".join(
            f"{sched} {pred.step_ms:.0f}" for sched, pred in predicted.items() if pred))
    default_cut = 1 + 2 * (BLOCKS // 2)  # embedding + half the blocks | the rest + head
    times = spawn_local(ranks_main, K, (plans, default_cut, args.steps, args.rounds),
                        threads=1, timeout_s=3600)[0]
    # the fastest step of each: load from other processes only ever slows a step down
    base = min(times["single", 1])
    ours_names = [f"ours-{s}" for s, _ in SCHEDULES]
    torch_names = [name for name, _, _ in TORCH]
    names = [*ours_names, "torch-default", *torch_names]
    rate = {name: {m: BATCH / min(times[name, m]) for m in MICROBATCHES if (name, m) in times}
            for name in names}
    # the same micro-batches in one process, and what K ranks could reach with it: stages of
    # exactly equal work, free messages, the bubble of GPipe/1F1B ((K-1)/M of a stage's work)
    micro = {m: BATCH / min(times["single", m]) for m in MICROBATCHES}
    bound = {m: micro[m] * K * m / (m + K - 1) for m in MICROBATCHES}
    print("\ncut per M (layers [0, cut) on rank 0): torch-default " + describe(default_cut)
          + "; ours " + ", ".join(f"M={m} {describe(plans['gpipe', m].stages[0].layers[1])}"
                                  for m in MICROBATCHES))
    print(f"\n{'system':<16}" + "".join(f"{'M=' + str(m):>9}" for m in MICROBATCHES)
          + "   (samples/s, fastest step)")
    print(f"{'single':<16}" + f"{BATCH / base:>9.1f}")
    for name, r in {"single-M": micro, **rate, "balanced-bound": bound}.items():
        print(f"{name:<16}" + "".join(f"{r[m]:>9.1f}" if m in r else f"{'-':>9}"
                                      for m in MICROBATCHES))
    print("(single-M: one process doing the step as M micro-batches; balanced-bound: K ranks "
          "on that work with equal stages, free messages and the (K-1)/M bubble)")
    best = {name: max(r.values()) for name, r in rate.items()}
    print(f"\nload average now {os.getloadavg()[0]:.2f}; ours-gpipe alone: speedup "
          f"{best['ours-gpipe'] * base / BATCH:.2f}, vs torch-default "
          f"{best['ours-gpipe'] / best['torch-default']:.2f}, same split (torch GPipe) "
          f"{best['ours-gpipe'] / best['torch-our-split']:.2f}")
    print(f"balanced-bound at its best M: {max(bound.values()) * base / BATCH:.2f}x single")
    print(f"ours with GPipe or 1F1B alone (what the balanced bound caps): "
          f"{max(best['ours-gpipe'], best['ours-1f1b']) * base / BATCH:.2f}x single")
    winner = max(ours_names, key=lambda name: best[name])
    ours = best[winner]
    torch_best = max(best[name] for name in torch_names)
    print(f"best_schedule={winner.removeprefix('ours-')} "
          f"speedup_vs_single={ours * base / BATCH:.2f} "
          f"ratio_vs_torch_best={ours / torch_best:.2f} "
          f"ratio_vs_torch_default={ours / best['torch-default']:.2f}")


if __name__ == "__main__":
    main()
