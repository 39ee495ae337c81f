"""Section (b): the project's profiler on the device, its layers' sum against the whole model.

    python tools/gpu_check.py --out gpu-out --sections profiler

For each model of the settings (on a GPU the built-in ``gpt2-medium`` and ``resnet50``
shapes, in the settings' dtype): ``profile_model`` with the layers timed inside passes of the
whole model (``timing="model"``, split backward included: the profile a shipped one is made
from, written to ``DIR/profile-NAME.json``), the whole model's forward+backward as one module
(``time_whole_model``, the same harness), and ``profile_model`` with each layer timed alone
(``timing="layer"``, overhead corrected; ``DIR/profile-NAME-alone.json``). Per micro-batch
size: the sum of the layers' fwd+bwd over the whole model's, for both timings (goal 0.9..1.1,
as ``tools/bench_profiler.py`` on the CPU). The in-model profile is left in
``check.shared["profiles"]`` for section (d).
"""

from __future__ import annotations

from typing import Any

import torch

from executor.profiling.profiler import profile_model, time_whole_model
from executor.workloads.models import build_model
from gpucheck.record import Check, Section
from partitioner.formats.profile import Profile, save_profile

__all__ = ["has_profile", "layer_sums_ms", "profile_for_steps", "run", "summary"]

GOAL = (0.9, 1.1)


def layer_sums_ms(prof: Profile) -> list[float]:
    """Per micro-batch size, the sum over layers of fwd_ms + bwd_ms."""
    return [sum(lay.fwd_ms[j] + lay.bwd_ms[j] for lay in prof.layers)
            for j in range(len(prof.microbatch_sizes))]


def ratios(parts_ms: list[float], whole_ms: list[float]) -> list[float]:
    return [a / w for a, w in zip(parts_ms, whole_ms, strict=True)]


def profile_in_model(name: str, sizes: tuple[int, ...], check: Check,
                     split_backward: bool = True) -> Profile:
    """The in-model profile of built-in ``name`` on the check's device and dtype."""
    s = check.settings
    work = build_model(name, batch=max(sizes))
    return profile_model(work.model, work.sample, list(sizes), check.device, dtype=s.dtype,
                         warmup=s.warmup, repeat=s.repeat, timing="model", name=name,
                         input_info=work.input_info, split_backward=split_backward,
                         loss=(work.loss_fn, work.target))


def has_profile(check: Check, sizes: tuple[int, ...]) -> bool:
    """Whether section (b) profiled the steps' model at every size in ``sizes``."""
    prof = check.shared.get("profiles", {}).get(check.settings.steps_model)
    return isinstance(prof, Profile) and set(sizes) <= set(prof.microbatch_sizes)


def profile_for_steps(check: Check, sizes: tuple[int, ...]) -> tuple[Profile, str]:
    """The profile section (d) predicts from: section (b)'s, else one taken now."""
    name = check.settings.steps_model
    if has_profile(check, sizes):
        return check.shared["profiles"][name], "section profiler"
    return profile_in_model(name, sizes, check, split_backward=False), "taken by section steps"


def run(sec: Section, check: Check) -> None:
    s, dev = check.settings, check.device
    profiles: dict[str, Profile] = check.shared.setdefault("profiles", {})
    models: dict[str, Any] = {}
    sec.figures["goal"] = f"sum of layers / whole model in {GOAL[0]}..{GOAL[1]}"
    sec.figures["models"] = models
    for name, sizes in s.profile_models:
        fig: dict[str, Any] = {"microbatch_sizes": list(sizes), "dtype": s.dtype}
        models[name] = fig
        if not sec.fits(f"{name} in-model profile", s.estimate("profile model"), "model"):
            continue
        with sec.timing("model"):
            work = build_model(name, batch=max(sizes))  # the profiler never changes it
            prof = profile_model(work.model, work.sample, list(sizes), dev, dtype=s.dtype,
                                 warmup=s.warmup, repeat=s.repeat, timing="model", name=name,
                                 input_info=work.input_info, loss=(work.loss_fn, work.target))
            profiles[name] = prof
            path = check.out / f"profile-{name}.json"
            save_profile(prof, path)
            fig.update(layers=prof.num_layers, profile=path.name, how=prof.how,
                       in_model_sum_ms=layer_sums_ms(prof))
        if not sec.fits(f"{name} whole model", s.estimate("profile whole"), "whole"):
            continue
        with sec.timing("whole"):
            whole = time_whole_model(work.model, work.sample, list(sizes), dev, dtype=s.dtype,
                                     warmup=s.warmup, repeat=s.repeat)
            fig["whole_ms"] = [f + b for f, b in whole]
            fig["in_model_ratio"] = ratios(fig["in_model_sum_ms"], fig["whole_ms"])
        if not sec.fits(f"{name} layers alone", s.estimate("profile alone"), "alone"):
            continue
        with sec.timing("alone"):
            alone = profile_model(work.model, work.sample, list(sizes), dev, dtype=s.dtype,
                                  warmup=s.warmup, repeat=s.repeat, timing="layer", name=name,
                                  input_info=work.input_info, split_backward=False)
            path = check.out / f"profile-{name}-alone.json"
            save_profile(alone, path)
            harness = alone.extra.get("harness", {})
            fig.update(alone_profile=path.name, alone_sum_ms=layer_sums_ms(alone),
                       alone_overhead_ms=[harness.get("overhead_fwd_ms"),
                                          harness.get("overhead_bwd_ms")])
            fig["alone_ratio"] = ratios(fig["alone_sum_ms"], fig["whole_ms"])
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    cells = [r for fig in models.values() for key in ("in_model_ratio", "alone_ratio")
             for r in fig.get(key, [])]
    sec.figures["cells_within_goal"] = (f"{sum(GOAL[0] <= r <= GOAL[1] for r in cells)} of "
                                        f"{len(cells)}")


def summary(fig: dict[str, Any]) -> str:
    """One line: per model, the range of the layers' sum over the whole model, each timing."""
    parts = []
    for name, m in fig.get("models", {}).items():
        spans = [f"{label} {min(m[key]):.2f}..{max(m[key]):.2f}"
                 for key, label in (("in_model_ratio", "in-model"), ("alone_ratio", "alone"))
                 if m.get(key)]
        parts.append(f"{name} {', '.join(spans) or 'no ratio'}")
    return (f"sum/whole: {'; '.join(parts)}; {fig.get('cells_within_goal', '0 of 0')} cells "
            f"within {GOAL[0]}..{GOAL[1]}")
