"""The whole job end to end on the built-in default model: profile, plan, simulate, train, compare.

    python tools/demo.py                    # what `make demo` runs; writes demo-out/
    python tools/demo.py --workload images  # the paper's other workload: a ResNet on images

Each step is one library call, and one command for your own model:
  1. profile   partition-model profile --model gpt-text --microbatch-sizes 1,2,4,8,16 --threads 1
  2. calibrate partition-model calibrate --job executor.workloads.jobs:translation --profile profile.json -B 16
               (the link between two local ranks, and the runtime from a short trial run)
  3. plan      partition-model search --profile profile.json --devices 2 --global-batch 16 \
                 --bandwidth ... --latency-ms ... --compute-scale ... --action-ms ...
  4. predict   partition-model simulate plan.json --trace predicted.json
  5. train     partition-model run --job executor.workloads.jobs:translation --plan plan.json --trace ...
  6. compare   partition-model compare predicted.json measured.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from executor.distributed.launch import run_rank
from executor.distributed.spawn import spawn_local
from executor.profiling.calibrate import measure_link, measure_runtime
from executor.profiling.profiler import profile_model
from executor.runtime.job import load_job
from executor.workloads.models import DEFAULT_MODEL, build_model
from partitioner.formats.plan import save_plan
from partitioner.formats.profile import save_profile
from partitioner.formats.timeline import load_chrome_trace, save_chrome_trace
from partitioner.formats.units import parse_bytes
from partitioner.report.compare import compare_timelines, relative_error
from partitioner.report.gantt import save_gantt_png
from partitioner.report.plans import plan_report, search_table
from partitioner.simulator.plans import simulate_plan
from partitioner.solve.planner import plan_from_solution
from partitioner.solve.search import search

#: The paper's two workloads: model to profile and job to train (see executor/workloads/jobs.py).
WORKLOADS = {
    "translation": (DEFAULT_MODEL, "executor.workloads.jobs:translation"),  # gpt-text, parallel corpus
    "images": ("resnet-tiny", "executor.workloads.jobs:images"),  # an image folder, one per class
}


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    p.add_argument("--memory-limit", default="24MiB", help="per rank (default 24MiB)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="translation",
                   help="translation: gpt-text on a parallel corpus (default); images: "
                        "resnet-tiny on an image folder. Data from $GPIPE_DATA, else synthetic")
    args = p.parse_args()
    model_name, job = WORKLOADS[args.workload]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    batch = args.global_batch

    say(f"1. profile {model_name} layer by layer (1 thread, as each rank will run)")
    work = build_model(model_name, batch=batch)
    sizes = [b for b in (1, 2, 4, 8, 16, 32) if b <= batch]
    profile = profile_model(work.model, work.sample, sizes, "cpu", threads=1, clock="thread",
                            name=model_name, input_info=work.input_info,
                            keep_freed_memory=True,  # as the ranks will run (run_rank)
                            loss=(load_job(job).loss_fn, work.target))  # the last stage's
    save_profile(profile, out / "profile.json")
    print(f"{profile.num_layers} layers at micro-batch sizes {sizes}: {out / 'profile.json'}")

    say("2. calibrate: the link between two local ranks (gloo on 127.0.0.1), and the runtime "
        "from a short trial run at M=1 and 4")
    link = measure_link()
    print(f"link {link.bandwidth_gbps:.2f} GB/s, {link.latency_ms:.3f} ms per message")
    runtime = measure_runtime(job, profile, batch, link=link)
    print(f"runtime: actions take {runtime.compute_scale:.3f} x their profiled time + "
          f"{runtime.action_ms:.3f} ms (a stage that waits between actions finds its "
          f"caches cold); messages "
          f"arrive {runtime.message_ms:.3f} ms after their send")

    say(f"3. search K <= 2, M, recompute and schedule under {args.memory_limit} per rank")
    result = search(profile, devices=2, global_batch=batch,
                    memory_limit_bytes=parse_bytes(args.memory_limit), link=link,
                    runtime=runtime)
    print(search_table(result, top=6))
    two = [c for c in result.candidates if c.stages == 2]
    if not two:
        print("no two-stage configuration fits; raise --memory-limit", file=sys.stderr)
        return 2
    best = two[0]
    plan = plan_from_solution(best.cost_model, best.solution, result.memory_limit_bytes)
    save_plan(plan, out / "plan.json")
    print("\n" + plan_report(plan, best.cost_model))

    say("4. predict the step (simulator)")
    sim, _, _ = simulate_plan(plan, profile)
    assert sim.timeline is not None
    save_chrome_trace(sim.timeline, out / "predicted.json")
    print(f"predicted step {sim.step_ms:.1f} ms, bubble {100 * sim.bubble_fraction:.1f}%: "
          f"{out / 'predicted.json'}")

    say(f"5. train {args.steps} steps on 2 local ranks (distributed executor, gloo)")
    summaries = spawn_local(run_rank, plan.build_schedule().ranks,
                            (job, str(out / "plan.json"), args.steps,
                             str(out / "measured.json"), "cpu", 60.0, True), threads=1)
    last = summaries[-1]
    warm = min(3, args.steps - 1)
    measured_ms = statistics.median(last["pipeline_ms"][warm:])
    print(f"loss {last['losses'][0]:.3f} -> {last['losses'][-1]:.3f}")

    say("6. prediction against reality")
    measured = load_chrome_trace(out / "measured.json")
    print(compare_timelines(sim.timeline, measured).report())
    err = relative_error(sim.step_ms, measured_ms)
    print(f"\npredicted step {sim.step_ms:.1f} ms, measured {measured_ms:.1f} ms (median of "
          f"steps {warm}..{args.steps - 1}): error {100 * err:+.1f}%")
    try:
        save_gantt_png([sim.timeline, measured], out / "timelines.png",
                       ["predicted", "measured (median of the last 5 steps)"])
        print(f"timelines: {out / 'timelines.png'}")
    except ImportError as exc:
        print(f"(no PNG: {exc})")
    print(f"\ndone in {time.perf_counter() - started:.0f} s; everything is in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
