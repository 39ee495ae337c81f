"""How well the simulator predicts real runs: predicted vs measured step time over a grid.

    python tools/bench_fidelity.py                  # gpt-text and resnet-tiny, K=2, M 1..8
    python tools/bench_fidelity.py --quick          # one model, two configurations
    python tools/bench_fidelity.py --schedules all  # every schedule, on two ranks each
    python tools/bench_fidelity.py --replicas       # also K=1 x D=2: the gradients' all-reduce

For each built-in model: profile it layer by layer under the conditions a rank runs in (one
thread), measure the gloo link between two local ranks, calibrate the runtime (a short trial
of the exact K=2 plans at M=1 and M=4, recompute never: executor.profiling.calibrate.measure_runtime),
then for every (M, recompute) make the exact K=2 plan, predict its step with the simulator,
and train it on two local ranks (the distributed executor, one thread each), timing each
pipelined step between barriers. Prints the error of each configuration and, last, the
median |error| (goal: <= 10%). ``--uncalibrated`` predicts from the profile alone.

Every schedule runs on the same two ranks: gpipe, 1f1b, zb-h1 and synth (synthesised for
ZB-H1's placement; shown as ``synth: zb-h1`` where no synthesised schedule beat that one) with
one stage per rank, interleaved and zbv with two (K=4). The median over interleaved, zb-h1,
zbv and synth is printed apart (goal: <= 5%): the calibration trial runs GPipe only.

Memory: each configuration's predicted peak activations per stage (the simulator's replayed peak
less the training state) against the most the executor's stages held in a timed step (tensors
saved for backward and stashed inputs, ``executor.runtime.memory``); the worst stage's error is
shown, and the median and worst over GPipe and 1F1B, and apart over the others (the split
backward's I-to-W holding among them), printed last (goal: median <= 5%, worst <= 15%).

``--replicas`` adds, per model and M, the plan of two data-parallel replicas of the whole model
(K=1, D=2) on the two ranks, its all-reduce priced over the ring fitted to all-reduces timed
between them (``collective.measure_all_reduce``: through the executor's reducer), and
compares the predicted all-reduce with the measured one (each step's, on the rank that waited
least: the other also waits out the skew) and the step (goal: the all-reduce within 10%).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

from executor.distributed.spawn import spawn_local
from executor.profiling.calibrate import (
    measure_all_reduce,
    measure_link,
    measure_runtime,
    run_trials,
)
from executor.profiling.profiler import profile_model
from executor.runtime.job import load_job
from executor.workloads.models import build_model
from partitioner.cost.model import CostModel
from partitioner.formats.assumptions import Link, Runtime
from partitioner.formats.plan import Plan, save_plan
from partitioner.formats.plan_schedule import PLAN_SCHEDULES, SYNTH
from partitioner.formats.profile import Profile
from partitioner.report.compare import relative_error
from partitioner.report.tables import format_table
from partitioner.simulator.engine import simulate
from partitioner.simulator.plans import simulate_plan
from partitioner.solve.planner import make_plan

TRIAL_MS = (1, 4)  # the calibration trial's M (recompute never)
#: Schedules with two stages on each of the two ranks (the rest have one).
TWO_PER_RANK = ("interleaved", "zbv")
#: What ``--schedules all`` adds to the fill-drain pair the fidelity goal was first set on.
NEW_SCHEDULES = ("interleaved", "zb-h1", "zbv", SYNTH)
WORKLOADS = {"gpt-text": "executor.workloads.jobs:translation", "resnet-tiny": "executor.workloads.jobs:images"}


def _profile_on_rank(name: str, batch: int, sizes: list[int], clock: str,
                     flush_bytes: int | None = None) -> Profile:
    """Every rank profiles the same model at once, so each layer is timed while the other
    cores are busy too, as they are when the pipeline runs."""
    work = build_model(name, batch=batch)
    loss = (load_job(WORKLOADS[name]).loss_fn, work.target)  # what the runs' last stage keeps
    return profile_model(work.model, work.sample, sizes, "cpu", threads=1, clock=clock,
                         flush_bytes=flush_bytes, name=name, input_info=work.input_info,
                         keep_freed_memory=True, loss=loss)  # as the trial and the runs have it


def _plan_for(profile: Profile, batch: int, m: int, mode: str, sched: str, link: Link,
              runtime: Runtime) -> Plan:
    """The exact plan of ``sched`` on the two ranks (a synthesised schedule on ZB-H1's)."""
    v = 2 if sched in TWO_PER_RANK else 1
    cm = CostModel(profile, batch, m, stages=2 * v, recompute=mode,  # type: ignore[arg-type]
                   schedule="zb-h1" if sched == SYNTH else sched,  # type: ignore[arg-type]
                   link=link, runtime=runtime, stages_per_rank=v)
    return make_plan(cm, devices=["cpu"] * (2 * v), synthesise=sched == SYNTH)


def _replica_rows(name: str, profile: Profile, batch: int, ms: list[int], link: Link,
                  runtime: Runtime, ring: Link, warmup: int, steps: int, tmp: str
                  ) -> tuple[list[list[object]], list[float]]:
    """K=1 x D=2 on the two ranks at each M: rows and the all-reduce's |errors|."""
    paths, plans = [], []
    for m in ms:
        if batch % 2 or batch // 2 < m:
            continue
        cm = CostModel(profile, batch, m, stages=1, link=link, runtime=runtime, replicas=2,
                       allreduce_link=ring)
        plan = make_plan(cm, devices=["cpu"])
        sim = simulate(cm, plan.layer_ranges(), record=False)
        paths.append(str(Path(tmp) / f"{name}-{m}-replicas.json"))
        save_plan(plan, paths[-1])
        plans.append((m, plan, sim.step_ms, sim.allreduce_ms[0]))
    per_rank = spawn_local(run_trials, 2, (WORKLOADS[name], paths, 3, steps),
                           threads=1, timeout_s=300.0)
    rows, errors = [], []
    for j, (m, _plan, step, reduce_ms) in enumerate(plans):
        measured_step = max(statistics.median(r[j].step_ms) for r in per_rank)
        measured = statistics.median(min(t) for t in zip(*(r[j].allreduce_ms for r in per_rank),
                                                         strict=True))
        err = (reduce_ms - measured) / measured
        errors.append(abs(err))
        rows.append([name, m, f"{step:.1f}", f"{measured_step:.1f}",
                     f"{100 * (step - measured_step) / measured_step:+.1f}%",
                     f"{reduce_ms:.2f}", f"{measured:.2f}", f"{100 * err:+.1f}%"])
    return rows, errors


def _schedules(spec: str) -> list[str]:
    names = list(PLAN_SCHEDULES) if spec == "all" else spec.split(",")
    bad = [n for n in names if n not in PLAN_SCHEDULES]
    if bad:
        raise SystemExit(f"--schedules {spec}: {', '.join(bad)} not a schedule; give 'all' or "
                         f"names from {', '.join(PLAN_SCHEDULES)}")
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(WORKLOADS), help="built-in models to run")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--microbatches", default="1,2,4,8")
    p.add_argument("--recompute", default="never,always")
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--clock", default="thread", choices=("thread", "wall"),
                   help="profiler clock (thread: CPU time of the profiling thread)")
    p.add_argument("--alone", action="store_true",
                   help="profile in this process alone (default: on two ranks at once, as "
                        "the pipeline's ranks run)")
    p.add_argument("--flush-mib", type=int, default=None,
                   help="profile with the caches flushed by a buffer of this many MiB before "
                        "each timed region (default: the profiler's, twice the L2 cache)")
    p.add_argument("--uncalibrated", action="store_true",
                   help="predict with the profile as it is (no runtime calibration)")
    p.add_argument("--schedules", default="gpipe",
                   help="schedules to run (default gpipe; gpipe,1f1b for both; all: every "
                        "one)")
    p.add_argument("--replicas", action="store_true",
                   help="also run K=1 x D=2 (two replicas) and compare the all-reduce")
    p.add_argument("--quick", action="store_true", help="gpt-text, M=2 and 4, never: a smoke run")
    args = p.parse_args()
    models = args.models.split(",")
    ms = [int(x) for x in args.microbatches.split(",")]
    modes = args.recompute.split(",")
    schedules = _schedules(args.schedules)
    if args.quick:
        models, ms, modes, args.steps, args.warmup = ["gpt-text"], [2, 4], ["never"], 3, 1
    batch = args.global_batch
    flush = None if args.flush_mib is None else args.flush_mib << 20

    link = measure_link()
    print(f"link (gloo, 2 local ranks): {link.bandwidth_gbps:.2f} GB/s + "
          f"{link.latency_ms:.3f} ms per message")
    ring = measure_all_reduce(2) if args.replicas else None
    if ring is not None:
        print(f"all-reduce (gloo, 2 local ranks, ring fit): {ring.bandwidth_gbps:.2f} GB/s + "
              f"{ring.latency_ms:.3f} ms per step of the ring")
    replica_rows: list[list[object]] = []
    replica_errors: list[float] = []
    rows, errors, unseen, new = [], [], [], []
    memory: list[tuple[str, float]] = []  # (schedule, |error| of the worst stage)
    per_schedule: dict[str, list[float]] = {s: [] for s in schedules}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            sizes = sorted({-(-batch // m) for m in ms} | {batch // m for m in ms if batch // m}
                           | ({batch // (2 * m) for m in ms if batch // (2 * m)}
                              if args.replicas else set()))  # K=1 x D=2: b = B/(2M)
            if args.alone:
                profile = _profile_on_rank(name, batch, sizes, args.clock, flush)
            else:
                profile = spawn_local(_profile_on_rank, 2,
                                      (name, batch, sizes, args.clock, flush),
                                      threads=1, timeout_s=300.0)[0]
            runtime = (Runtime() if args.uncalibrated
                       else measure_runtime(WORKLOADS[name], profile, batch, link=link,
                                            microbatches=TRIAL_MS))
            how = ("uncalibrated" if args.uncalibrated else
                   f"fitted on a trial at M={','.join(map(str, TRIAL_MS))}, recompute never")
            print(f"{name}: runtime ({how}): actions take {runtime.compute_scale:.3f} x "
                  f"profiled + {runtime.action_ms:.3f} ms, messages arrive "
                  f"{runtime.message_ms:.3f} ms after their send", flush=True)
            plans, predicted, held = [], [], []
            paths = []
            for m, mode, sched in itertools.product(ms, modes, schedules):
                plan = _plan_for(profile, batch, m, mode, sched, link, runtime)
                paths.append(str(Path(tmp) / f"{name}-{m}-{mode}-{sched}.json"))
                save_plan(plan, paths[-1])
                assert plan.predicted is not None
                plans.append((m, mode, sched, plan))
                predicted.append(plan.predicted.step_ms)
                held.append(simulate_plan(plan, profile)[0].stage_activation_peak_bytes)
            per_rank = spawn_local(run_trials, 2, (WORKLOADS[name], paths, args.warmup,
                                                   args.steps), threads=1, timeout_s=300.0)
            if ring is not None:
                got, errs = _replica_rows(name, profile, batch, ms, link, runtime, ring,
                                          args.warmup, args.steps, tmp)
                replica_rows += got
                replica_errors += errs
            for j, (m, mode, sched, plan) in enumerate(plans):
                measured = max(statistics.median(r[j].step_ms) for r in per_rank)
                err = (predicted[j] - measured) / measured
                trial = (not args.uncalibrated and mode == "never" and m in TRIAL_MS
                         and plan.schedule == "gpipe")
                errors.append(abs(err))
                if not trial:
                    unseen.append(abs(err))
                per_schedule[sched].append(abs(err))
                if sched in NEW_SCHEDULES:
                    new.append(abs(err))
                peaks = {k: v for r in per_rank for k, v in r[j].activation_peak_bytes.items()}
                worst = max((relative_error(held[j][k], peaks[k]) for k in sorted(peaks)),
                            key=abs)
                memory.append((sched, abs(worst)))
                shown = sched if sched == plan.schedule else f"{sched}: {plan.schedule}"
                rows.append([name, m, mode, shown, f"{plan.boundaries}", f"{predicted[j]:.1f}",
                             f"{measured:.1f}", f"{100 * err:+.1f}%", "yes" if trial else "",
                             " / ".join(f"{peaks[k] / 2**20:.2f}" for k in sorted(peaks)),
                             f"{100 * worst:+.1f}%"])
    print(format_table(["model", "M", "recompute", "schedule", "cuts", "predicted_ms", "measured_ms",
                        "error", "in trial", "held_MiB", "memory error"], rows))
    if unseen and len(unseen) < len(errors):
        print(f"\nmedian |error| over the {len(unseen)} configurations the calibration trial "
              f"did not run: {100 * statistics.median(unseen):.1f}%")
    if replica_rows:
        print("\nK=1 x D=2 (two replicas of the whole model on the two ranks):")
        print(format_table(["model", "M", "predicted_ms", "measured_ms", "step error",
                            "allreduce_ms", "measured", "error"], replica_rows))
        print(f"median |error| of the all-reduce over {len(replica_errors)} configurations: "
              f"{100 * statistics.median(replica_errors):.1f}% (goal <= 10%)")
    if len(schedules) > 1:  # the machine's noise shows in the old ones' figures too
        print("\nmedian |error| per schedule: " + ", ".join(
            f"{s} {100 * statistics.median(e):.1f}%" for s, e in per_schedule.items() if e))
    if new:
        print(f"\nmedian |error| over the {len(new)} configurations of "
              f"{', '.join(s for s in NEW_SCHEDULES if s in schedules)}: "
              f"{100 * statistics.median(new):.1f}% (goal <= 5%)")
    print(f"\nmedian |error| of the step time over {len(errors)} configurations: "
          f"{100 * statistics.median(errors):.1f}% (goal <= 10%)")
    for label, names in (("GPipe and 1F1B", ("gpipe", "1f1b")),
                         ("the other schedules", NEW_SCHEDULES)):
        errs = [e for sched, e in memory if sched in names]
        if errs:
            print(f"memory (peak activations, the worst stage) over the {len(errs)} "
                  f"configurations of {label}: median |error| "
                  f"{100 * statistics.median(errs):.1f}% (goal <= 5%), worst "
                  f"{100 * max(errs):.1f}% (goal <= 15%)")


if __name__ == "__main__":
    main()
