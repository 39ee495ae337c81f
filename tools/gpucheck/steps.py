"""Section (d): whole GPipe steps on one device, predicted by the simulator from the new profile.

    python tools/gpu_check.py --out gpu-out --sections profiler,steps

As the reference steps were taken (``shared/reference/h200/steps/``): the model (on a GPU the
``gpt2-medium`` shape, bf16) cut into ``segments`` = 4 contiguous segments of equal layer
counts (cut after layer round(L k / 4)), all on ONE device, GPipe fill-drain, B=16 in M = 1,
2, 4, 8, 16 micro-batches, without and with recompute (every segment keeps only its input and
reruns its forward in the backward); no optimizer step, gradients set to None before each step.
Each step is timed whole (``record.time_steps``: median and fastest of the repeats), with
the allocator's peak above what was allocated before the step and each segment's peak
activations as the executor counts them (against the simulator's); the steps are also written in
the reference's own format (``gpipe-steps/0``) as ``DIR/steps-NAME.json``.

Predicted: ``simulate`` on the profile section (b) just took (or, if it did not, one taken
here), stages on one device (so they run one at a time and exchange tensors for free), no
optimizer state. Twice: with the profile as it is (``predicted_ms``), and with a runtime
fitted on the measured F and B actions of the steps at M=1 and M=4 without recompute
(``executor.profiling.calibrate.fit_runtime``: the project's calibration; ``calibrated_ms``,
those two configurations marked ``in_fit``). Error = (predicted - measured) / measured.
"""

from __future__ import annotations

import itertools
import json
import statistics
from dataclasses import replace
from typing import Any

import torch

from executor.profiling.calibrate import fit_runtime
from executor.runtime.pipeline import Pipeline, manual_plan
from executor.workloads.models import Workload, build_model
from gpucheck.profiler import has_profile, profile_for_steps
from gpucheck.record import Check, Section, sync, time_steps
from partitioner.cost.model import CostModel
from partitioner.formats.assumptions import LINKS
from partitioner.formats.profile import Profile
from partitioner.formats.timeline import Timeline
from partitioner.schedule.recompute import Recompute
from partitioner.simulator.durations import stage_durations, stage_of_ranges
from partitioner.simulator.engine import simulate

__all__ = ["run", "summary"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FIT_MS = (1, 4)  # the configurations (recompute off) the runtime is fitted on


def _action_pairs(cm: CostModel, ranges: list[tuple[int, int]],
                  timeline: Timeline) -> list[tuple[float, float]]:
    """(profiled, measured) ms of every F and B action of one measured step."""
    dur = stage_durations(cm, stage_of_ranges(ranges), [0] * len(ranges))
    out = []
    for e in timeline.events:
        k, i = e.action.stage, e.action.microbatch
        if e.action.kind in ("F", "B"):
            table = dur.fwd_ms if e.action.kind == "F" else dur.bwd_ms
            out.append((table[k][dur.size_index[i]], e.duration_ms))
    return out


def reference_steps(check: Check, prof: Profile, work: Workload,
                    configs: list[dict[str, Any]]) -> dict[str, Any]:
    """The measured steps in the format of ``shared/reference/h200/steps/`` (gpipe-steps/0)."""
    s = check.settings
    how = (f"One training step measured whole from the host, the device synchronised before "
           f"and after (median of {s.steps_repeat} after {s.steps_warmup} warm-up; step_ms_min "
           f"is the fastest): the model ({len(work.model)} layers) cut into `segments` "
           f"contiguous segments of equal layer counts (cut after layer round(L*k/segments)), "
           f"all on ONE device, run by the project's local runner (executor Pipeline, GPipe "
           f"schedule: the M forwards, then the M backwards in reverse order), micro-batch "
           f"i's loss weighted b_i/B. With recompute, every segment keeps only its input and "
           f"reruns its forward during the backward (recompute='always'). No optimizer step; "
           f"gradients set to None before each step, inside the timed region. "
           f"peak_bytes_above_params: torch.cuda.max_memory_allocated over the timed steps "
           f"minus what was allocated before them (parameters, no gradients); null on a CPU.")
    return {
        "format": "gpipe-steps/0", "model": s.steps_model,
        "profile": f"gpu_check profile-{s.steps_model}.json ({prof.created})",
        "device": prof.device.name, "torch": torch.__version__, "dtype": s.dtype,
        "input": {k: v for k, v in work.input_info.items() if k in ("kind", "vocab", "seq")},
        "global_batch": s.steps_batch, "how": how,
        "steps": [{"microbatches": c["microbatches"], "segments": s.segments,
                   "recompute": c["recompute"], "step_ms": c["step_ms"],
                   "step_ms_min": c["step_ms_min"],
                   "peak_bytes_above_params": c["peak_bytes_above_params"]}
                  for c in configs]}


def run(sec: Section, check: Check) -> None:
    s, dev = check.settings, check.device
    big_b, big_k = s.steps_batch, s.segments
    sizes = tuple(sorted({-(-big_b // m) for m in s.steps_microbatches}
                         | {big_b // m for m in s.steps_microbatches}))
    if not has_profile(check, sizes) and not sec.fits(
            "a profile to predict from (section profiler took none)",
            check.settings.estimate("profile model"), "profile"):
        return
    prof, source = profile_for_steps(check, sizes)
    work = build_model(s.steps_model, batch=big_b)
    model = work.model.to(device=dev, dtype=DTYPES[s.dtype])
    x, y = work.sample.to(dev), work.target.to(dev)
    cuts = [round(len(model) * k / big_k) for k in range(big_k + 1)]
    ranges = list(itertools.pairwise(cuts))
    fig = sec.figures
    fig.update(model=s.steps_model, dtype=s.dtype, global_batch=big_b, segments=big_k,
               cuts=cuts, profile=source, repeat=s.steps_repeat)
    configs: list[dict[str, Any]] = []
    fig["configs"] = configs
    models: dict[tuple[bool, int], CostModel] = {}
    pairs: list[tuple[float, float]] = []
    cuda = dev.type == "cuda"
    for recompute in (False, True):
        for m in s.steps_microbatches:
            what = f"M={m} recompute={'on' if recompute else 'off'}"
            if not sec.fits(what, s.estimate("steps config"), "config"):
                continue
            with sec.timing("config"):
                mode: Recompute = "always" if recompute else "never"
                pipe = Pipeline(model, manual_plan(cuts, m, big_b, "gpipe", mode,
                                                   [str(dev)] * big_k))

                def step(p: Pipeline = pipe) -> None:
                    model.zero_grad(set_to_none=True)
                    p.train_step(x, y, work.loss_fn)

                model.zero_grad(set_to_none=True)
                sync(dev)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev) if cuda else 0
                measured = time_steps(step, dev, s.steps_warmup, s.steps_repeat)
                peak = torch.cuda.max_memory_allocated(dev) - base if cuda else None
                cm = CostModel(prof, big_b, m, stages=big_k, recompute=mode,
                               schedule="gpipe", link=LINKS["free"], optimizer="none")
                models[recompute, m] = cm
                res = simulate(cm, ranges, devices=[0] * big_k, record=False)
                if not recompute and m in FIT_MS and pipe.last_timeline is not None:
                    pairs += _action_pairs(cm, ranges, pipe.last_timeline)
                configs.append({
                    "microbatches": m, "recompute": recompute,
                    "step_ms": measured["median_ms"], "step_ms_min": measured["min_ms"],
                    "predicted_ms": res.step_ms,
                    "error": (res.step_ms - measured["median_ms"]) / measured["median_ms"],
                    "peak_bytes_above_params": peak,
                    "predicted_stage_peak_bytes": list(res.stage_peak_bytes),
                    # what each segment held for backward (executor.runtime.memory), predicted
                    "held_activation_peak_bytes": (pipe.last_timeline.meta.get(
                        "stage_activation_peak_bytes") if pipe.last_timeline else None),
                    "predicted_activation_peak_bytes": list(res.stage_activation_peak_bytes)})
    model.zero_grad(set_to_none=True)
    if configs:
        path = check.out / f"steps-{s.steps_model}.json"
        path.write_text(json.dumps(reference_steps(check, prof, work, configs), indent=1) + "\n")
        fig["steps_file"] = path.name
    errors = [abs(c["error"]) for c in configs]
    fig["median_abs_error"] = statistics.median(errors) if errors else None
    try:
        runtime = fit_runtime([p for p, _ in pairs], [t for _, t in pairs])
    except ValueError as exc:  # too few or degenerate actions: the figures above still hold
        fig["runtime"] = f"not fitted: {exc}"
        return
    fig["runtime"] = {"compute_scale": runtime.compute_scale, "action_ms": runtime.action_ms,
                      "fitted_on": f"{len(pairs)} F and B actions of the steps at M in "
                                   f"{FIT_MS}, recompute off"}
    for c in configs:
        cm = replace(models[c["recompute"], c["microbatches"]], runtime=runtime)
        c["calibrated_ms"] = simulate(cm, ranges, devices=[0] * big_k, record=False).step_ms
        c["calibrated_error"] = (c["calibrated_ms"] - c["step_ms"]) / c["step_ms"]
        c["in_fit"] = not c["recompute"] and c["microbatches"] in FIT_MS
    unseen = [abs(c["calibrated_error"]) for c in configs if not c["in_fit"]]
    fig["calibrated_median_abs_error"] = statistics.median(unseen) if unseen else None


def summary(fig: dict[str, Any]) -> str:
    """One line: the configurations measured and the median prediction errors."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"
    return (f"{len(fig.get('configs', []))} steps measured; median |error| "
            f"{pct(fig.get('median_abs_error'))} from the profile as it is, "
            f"{pct(fig.get('calibrated_median_abs_error'))} calibrated (outside the fit)")
