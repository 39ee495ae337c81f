"""One prepared GPU check: everything CUDA in the project, in one short run, within a budget.

    python tools/gpu_check.py --out gpu-out --budget-s 480    # on a machine with a GPU
    python tools/gpu_check.py --dry-run --out /tmp/gpu-dry    # the same code on the CPU, tiny

Sections, in order of value (each in ``tools/gpucheck/``, each recording its figures):

  (a) transparency  the local runner with every schedule, K = 1..4 stages all on cuda:0,
                    fp32 and bf16, loss and every gradient against a plain run
  (b) profiler      profile_model on the gpt2-medium and resnet50 shapes (layers timed in
                    the model and alone), their sum against the whole model's fwd+bwd
  (c) overhead      the local runner against a plain PyTorch loop on the same micro-batches
                    (gpt2-medium, B=16, M = 1, 4, 16; goal: at most 5% over the loop)
  (d) steps         whole GPipe steps on one device (4 segments, B=16, M = 1..16, recompute
                    off and on), measured, and predicted by the simulator from (b)'s profile

A budget clock (``--budget-s``) skips whatever would not fit before it ("skipped: budget"),
judged piece by piece; an exception ends only its own section (status "error", traceback
kept). ``DIR/gpu_check.json`` holds every figure and is rewritten after every piece of work,
so a run killed from outside leaves what it measured; ``DIR/summary.txt`` is a few lines.
The in-model profiles are written as ``DIR/profile-NAME.json`` (see profiles/h200/README.md
for how one becomes a shipped profile). Exit status 0 when it ran, whatever the figures say;
2 for bad arguments (for instance a GPU run on a machine without CUDA).

``--dry-run`` runs the same code paths on the CPU with tiny shapes (gpt-tiny, resnet-tiny,
bf16 still exercised) in well under a minute; ``tests/tools/test_gpu_check.py`` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, installed or not

import torch

from executor.runtime.devices import check_device, device_info, resolve_device
from gpucheck import overhead, profiler, steps, transparency
from gpucheck.record import Budget, Check, Report, Section
from gpucheck.settings import DRY_RUN, GPU, SECTIONS, Settings

#: section -> (its function, the estimate of its first piece of work, its summary line)
RUNS: dict[str, tuple[Callable[[Section, Check], None], str, Callable[[dict[str, Any]], str]]] = {
    "transparency": (transparency.run, "transparency", transparency.summary),
    "profiler": (profiler.run, "profile model", profiler.summary),
    "overhead": (overhead.run, "overhead", overhead.summary),
    "steps": (steps.run, "steps", steps.summary),
}
assert tuple(RUNS) == SECTIONS


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    """The arguments, checked together (every problem in one message), and the settings."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-out", help="output folder (default gpu-out)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="seconds the whole check may take (default 480)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same code on the CPU with tiny shapes (under a minute)")
    p.add_argument("--device", default=None, help="the GPU to check (default cuda:0)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, run in this order: {','.join(SECTIONS)} (default all)")
    args = p.parse_args(argv)
    problems = []
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        problems.append(f"--budget-s {args.budget_s:g}: the budget must be a positive number "
                        f"of seconds; e.g. --budget-s 480")
    args.section_list = [s for s in args.sections.split(",") if s]
    unknown = [s for s in args.section_list if s not in SECTIONS]
    if unknown or not args.section_list:
        what = f"{', '.join(unknown)} not among them" if unknown else "no section named"
        problems.append(f"--sections {args.sections!r}: {what}; name one or more of "
                        f"{', '.join(SECTIONS)}")
    if args.dry_run and args.device is not None:
        problems.append(f"--device {args.device} with --dry-run: a dry run is on the CPU; drop "
                        f"--device, or drop --dry-run to check that GPU")
    settings = DRY_RUN if args.dry_run else dataclasses.replace(GPU, device=args.device or GPU.device)
    if not args.dry_run:
        problem = check_device(settings.device)
        if problem is None and torch.device(settings.device).type != "cuda":
            problem = f"device {settings.device!r} is not a GPU"
        if problem is not None:
            problems.append(f"{problem}. This check measures a GPU (cuda:N); run it on a machine "
                            f"with one, or pass --dry-run to run the same code on the CPU with "
                            f"tiny shapes")
    if problems:
        p.error("\n  ".join(problems))
    return args, settings


def header(settings: Settings, device: torch.device, budget_s: float) -> dict[str, Any]:
    """What the figures were taken on and with."""
    info = device_info(device)
    out: dict[str, Any] = {
        "format": "gpipe-gpu-check/1", "mode": settings.mode,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": {"name": info.name, "kind": info.kind, "memory_bytes": info.memory_bytes,
                   "index": str(device)},
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "budget_s": budget_s,
        "settings": dataclasses.asdict(settings)}
    if device.type == "cuda":
        out["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                       "cudnn": torch.backends.cudnn.allow_tf32}
    return out


def summary(report: Report) -> str:
    data = report.data
    lines = [f"gpu check ({data['mode']}, {data['device']['name']}, torch {data['torch']}): "
             f"{data.get('elapsed_s', 0):.0f} s of a {data['budget_s']:.0f} s budget"]
    for name, fig in report.sections.items():
        status = fig["status"]
        if status == "skipped":
            detail = fig.get("reason", "")
        elif status == "error":
            detail = fig.get("error", "")
        else:
            detail = RUNS[name][2](fig)
            if fig.get("skipped"):
                detail += f" ({len(fig['skipped'])} pieces skipped: budget)"
        lines.append(f"{name}: {status} - {detail}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args, settings = parse_args(argv)
    budget = Budget(args.budget_s)
    if settings.mode == "dry-run":
        torch.set_num_threads(1)  # tiny shapes: thread hand-offs would cost more than the work
    device = resolve_device(settings.device)  # "cuda" alone: the current one, with its index
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events and streams made without a device go to it
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, header(settings, device, args.budget_s))
    check = Check(settings, device, out)
    for name in args.section_list:
        run, first, _ = RUNS[name]
        print(f"== {name} ({budget.left_s():.0f} s left)", flush=True)
        report.run(name, run, check, budget, settings.estimate(first))
        print(f"   {report.sections[name]['status']} in "
              f"{report.sections[name].get('elapsed_s', 0):.1f} s", flush=True)
    report.data["elapsed_s"] = round(budget.elapsed_s(), 2)
    report.write()
    text = summary(report)
    (out / "summary.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
