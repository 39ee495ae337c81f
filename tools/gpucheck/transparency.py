"""Section (a): the local runner is transparent on the device, in fp32 and in bf16.

    python tools/gpu_check.py --out gpu-out --sections transparency

Every schedule the project has (``gpipe``, ``1f1b``, ``zb-h1``; ``interleaved`` and ``zbv`` on
an even K; a schedule ``synth``esised by the project's list-scheduling search for unequal
stage times, and at K=4 one in the V shape), K = 1..4 stages all on the one device, B=7 in
M=3 uneven micro-batches (3, 2, 2), each recompute mode: one training step of the pipeline
against a plain (non-pipelined) run of the same model on the same batch and device.

Rules (written into the JSON as ``rules``):

- fp32: the loss, every parameter's gradient and the forward's output within a relative
  error of ``fp32_rtol`` (1e-5, the CPU tests') of the plain fp32 run; error of a tensor g
  against the plain g0 is ||g - g0|| / ||g0||.
- bf16: the pipeline with bf16 parameters against the plain *fp32* run, within
  ``bf16_rtol`` (5e-2). bf16 keeps 8 significant bits, so the plain bf16 run is itself off the
  fp32 one (2.5e-2 for the worst gradient of gpt-tiny on a CPU); ``plain_bf16_error`` records
  that figure on this device, the yardstick for the pipeline's.
- Dropout replayed: with a dropout layer, a step with re-materialisation (``always``,
  ``except_last``) gives the gradients of the step without it, from the same seed (the
  device's random state is replayed), and another seed gives others (the check has teeth).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from executor.runtime.pipeline import Pipeline, manual_plan
from executor.workloads.models import Workload, build_model
from gpucheck.record import Check, Section
from partitioner.schedule.generators import v_placement
from partitioner.schedule.ir import Schedule
from partitioner.schedule.listsched import Costs
from partitioner.schedule.recompute import RECOMPUTE_MODES
from partitioner.schedule.synthesis import synthesise

__all__ = ["run", "schedules", "summary"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def synthesised(stages: int, microbatches: int, placement: tuple[int, ...]) -> Schedule:
    """A schedule of the project's synthesiser for unequal stage times, so that its order is
    the list scheduler's own rather than a fixed generator's."""
    times = (1.0, 2.5, 0.5, 1.5)[:stages]
    costs = Costs(times, tuple(1.3 * t for t in times), tuple(0.6 * t for t in times),
                  (0.2,) * stages, (0.1,) * stages)
    return synthesise(costs, placement, microbatches, max_tries=50).schedule


def schedules(stages: int, microbatches: int) -> list[tuple[str, dict[str, Any]]]:
    """Every schedule K ``stages`` allow, as ``manual_plan`` takes them (name, options)."""
    out: list[tuple[str, dict[str, Any]]] = [("gpipe", {}), ("1f1b", {}), ("zb-h1", {})]
    if stages % 2 == 0:
        out += [("interleaved", {"stages_per_rank": 2}), ("zbv", {})]
    out.append(("synth", {"actions": synthesised(stages, microbatches, tuple(range(stages)))}))
    if stages == 4:
        out.append(("synth-v", {"actions": synthesised(4, microbatches, v_placement(2))}))
    return out


def rel_error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp32 (inf for a missing gradient)."""
    if got is None:
        return float("inf")
    want = want.float()
    return float((got.float() - want).norm()) / max(float(want.norm()), 1e-30)


def plain_run(work: Workload, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The oracle: the whole batch through the model at once, loss, gradients and output."""
    model = copy.deepcopy(work.model).to(device=device, dtype=dtype)
    x, y = work.sample.to(device), work.target.to(device)
    loss = work.loss_fn(model(x), y)
    torch.autograd.backward(loss)
    with torch.no_grad():
        out = model(x)
    return {"loss": loss.detach().float(), "out": out.float(),
            "grads": {n: p.grad.detach().float() for n, p in model.named_parameters()
                      if p.grad is not None}}


def errors(model_loss: torch.Tensor, grads: dict[str, torch.Tensor | None], out: torch.Tensor,
           want: dict[str, Any]) -> dict[str, Any]:
    per_param = {n: rel_error(grads.get(n), g) for n, g in want["grads"].items()}
    worst = max(per_param, key=lambda n: per_param[n])
    return {"loss_error": rel_error(model_loss, want["loss"]),
            "max_grad_error": per_param[worst], "worst_param": worst,
            "forward_error": rel_error(out, want["out"])}


def one_case(work: Workload, device: torch.device, dtype: str, stages: int, schedule: str,
             options: dict[str, Any], recompute: str, microbatches: int,
             want: dict[str, Any], rtol: float) -> dict[str, Any]:
    model = copy.deepcopy(work.model).to(device=device, dtype=DTYPES[dtype])
    cuts = [round(k * len(model) / stages) for k in range(stages + 1)]
    plan = manual_plan(cuts, microbatches, work.sample.shape[0],
                       "gpipe" if schedule.startswith("synth") else schedule, recompute,
                       [str(device)] * stages, **options)
    pipe = Pipeline(model, plan)
    loss = pipe.train_step(work.sample, work.target, work.loss_fn)
    with torch.no_grad():
        out = torch.as_tensor(pipe(work.sample))
    found = errors(loss, {n: p.grad for n, p in model.named_parameters()}, out, want)
    passed = all(found[k] <= rtol for k in ("loss_error", "max_grad_error", "forward_error"))
    return {"dtype": dtype, "stages": stages, "schedule": schedule, "recompute": recompute,
            "microbatches": microbatches, "cuts": cuts,
            "kinds": sorted({a.kind for a in pipe.runner.order}), **found, "pass": passed}


def dropout_replay(work: Workload, device: torch.device, rtol: float) -> dict[str, Any]:
    """A dropout layer after layer 1, K=2 (1F1B): re-materialised steps against one without."""
    def grads(recompute: str, seed: int) -> dict[str, torch.Tensor]:
        layers = list(copy.deepcopy(work.model))
        model = nn.Sequential(*layers[:2], nn.Dropout(0.3), *layers[2:]).to(device)
        half = len(model) // 2
        plan = manual_plan([0, half, len(model)], 3, work.sample.shape[0], "1f1b", recompute,
                           [str(device)] * 2)
        torch.manual_seed(seed)  # the CPU's and every CUDA device's generator
        Pipeline(model, plan).train_step(work.sample, work.target, work.loss_fn)
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()
                if p.grad is not None}

    def worst(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
        return max(rel_error(got.get(n), g) for n, g in want.items())

    kept = grads("never", 5)
    replayed = {mode: worst(grads(mode, 5), kept) for mode in RECOMPUTE_MODES
                if mode != "never"}
    other = worst(grads("always", 6), kept)
    return {"error_vs_never": replayed, "error_other_seed": other,
            "pass": all(e <= rtol for e in replayed.values()) and other > rtol}


def run(sec: Section, check: Check) -> None:
    s, dev = check.settings, check.device
    work = build_model(s.transparency_model, batch=s.transparency_batch)
    m = s.transparency_microbatches
    oracle = plain_run(work, torch.float32, dev)
    bf16 = plain_run(work, torch.bfloat16, dev)
    fig = sec.figures
    fig["rules"] = {
        "float32": f"pipeline fp32 vs plain fp32: loss, every gradient and the output within "
                   f"relative error {s.fp32_rtol:g} (||g - g0|| / ||g0||)",
        "bfloat16": f"pipeline bf16 vs plain fp32: the same within {s.bf16_rtol:g}",
        "dropout": "recompute always/except_last vs never, same seed: gradients within the "
                   "fp32 tolerance; another seed must differ by more"}
    fig["model"], fig["batch"], fig["microbatches"] = s.transparency_model, work.sample.shape[0], m
    fig["plain_bf16_error"] = errors(bf16["loss"], dict(bf16["grads"]), bf16["out"], oracle)
    cases: list[dict[str, Any]] = []
    fig["cases"] = cases
    turn = 0
    for dtype in DTYPES:
        rtol = s.fp32_rtol if dtype == "float32" else s.bf16_rtol
        for stages in (1, 2, 3, 4):
            for schedule, options in schedules(stages, m):
                modes = RECOMPUTE_MODES if s.every_recompute else (RECOMPUTE_MODES[turn % 3],)
                turn += 1
                for recompute in modes:
                    what = f"{dtype} K={stages} {schedule} {recompute}"
                    if not sec.fits(what, s.estimate("transparency case"), "case"):
                        continue
                    with sec.timing("case"):
                        cases.append(one_case(work, dev, dtype, stages, schedule, options,
                                              recompute, m, oracle, rtol))
    if sec.fits("dropout replay", 4 * s.estimate("transparency case"), "case"):
        with sec.timing("case"):
            fig["dropout"] = dropout_replay(work, dev, s.fp32_rtol)
    per: dict[str, dict[str, int]] = {}
    for case in cases:
        row = per.setdefault(f"{case['schedule']} {case['dtype']}", {"cases": 0, "pass": 0})
        row["cases"] += 1
        row["pass"] += int(case["pass"])
    fig["per_schedule"] = per
    fig["max_error"] = {d: max((max(c["loss_error"], c["max_grad_error"], c["forward_error"])
                                for c in cases if c["dtype"] == d), default=None)
                        for d in DTYPES}
    fig["all_pass"] = (bool(cases) and all(c["pass"] for c in cases)
                       and fig.get("dropout", {}).get("pass", False))


def summary(fig: dict[str, Any]) -> str:
    """One line: how many cases passed, the worst errors against their tolerances."""
    cases = fig.get("cases", [])
    worst = fig.get("max_error", {})
    drop = fig.get("dropout", {}).get("pass")
    failed = sorted({f"{c['schedule']} {c['dtype']}" for c in cases if not c["pass"]})
    return (f"{sum(c['pass'] for c in cases)} of {len(cases)} cases pass; worst error fp32 "
            f"{_g(worst.get('float32'))}, bf16 {_g(worst.get('bfloat16'))} (plain bf16: "
            f"{_g(fig.get('plain_bf16_error', {}).get('max_grad_error'))}); dropout replay "
            f"{'pass' if drop else 'FAIL' if drop is not None else 'not run'}"
            + (f"; failed: {', '.join(failed)}" if failed else ""))


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"
