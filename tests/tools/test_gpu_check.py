"""tools/gpu_check.py: its dry run (the GPU check's code paths on the CPU, tiny shapes) gives
every figure of every section; a tiny budget skips sections cleanly; bad arguments are refused
with the fix; a section that raises loses only its own figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from partitioner.formats.profile import load_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from gpucheck.record import Budget, Check, Report, Section
from gpucheck.settings import DRY_RUN, SECTIONS

ROOT = Path(__file__).resolve().parents[2]

#: The schedules the project has (partitioner.schedule.generators.SCHEDULES and synthesised).
EVERY_SCHEDULE = {"gpipe", "1f1b", "interleaved", "zb-h1", "zbv", "synth"}


def run_check(tmp_path: Path, *args: str, timeout_s: float = 200) -> subprocess.CompletedProcess[str]:
    """The check as a GPU machine runs it: from this checkout, and without OR-Tools (that
    machine has none: a stand-in package refuses to import)."""
    stub = tmp_path / "no-ortools" / "ortools"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text("raise ImportError('no OR-Tools on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(stub.parent), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), *args],
                          capture_output=True, text=True, timeout=timeout_s, env=env)


def finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.timeout(240)
def test_the_dry_run_gives_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_check(tmp_path, "--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run" and report["device"]["kind"] == "cpu"
    sections = report["sections"]
    assert list(sections) == list(SECTIONS)
    assert {n: s["status"] for n, s in sections.items()} == dict.fromkeys(SECTIONS, "ok"), \
        {n: s.get("error") or s.get("skipped") for n, s in sections.items()}
    assert report["elapsed_s"] < 60, report["elapsed_s"]

    # (a) every schedule, K = 1..4, both dtypes, every recompute mode; all within tolerance
    trans = sections["transparency"]
    cases = trans["cases"]
    assert {c["schedule"].removesuffix("-v") for c in cases} == EVERY_SCHEDULE
    assert {(c["schedule"], c["dtype"]) for c in cases} >= {
        (s, d) for s in EVERY_SCHEDULE for d in ("float32", "bfloat16")}
    assert {c["stages"] for c in cases} == {1, 2, 3, 4}
    assert {c["recompute"] for c in cases} == {"never", "always", "except_last"}
    failed = [c for c in cases if not c["pass"]]
    assert not failed and trans["all_pass"], failed
    assert all(c["max_grad_error"] <= DRY_RUN.fp32_rtol for c in cases if c["dtype"] == "float32")
    bf16 = [c["max_grad_error"] for c in cases if c["dtype"] == "bfloat16"]
    assert max(bf16) <= DRY_RUN.bf16_rtol and min(bf16) > 0  # really ran in bf16
    assert all({"I", "W"} <= set(c["kinds"]) for c in cases if c["schedule"] in ("zb-h1", "zbv"))
    assert trans["dropout"]["pass"] and trans["dropout"]["error_other_seed"] > 1e-3
    assert "bfloat16" in trans["rules"] and finite(trans["plain_bf16_error"]["max_grad_error"])

    # (b) both models, both timings: the layers' sums and the whole model, as numbers
    for name, sizes in DRY_RUN.profile_models:
        fig = sections["profiler"]["models"][name]
        for key in ("in_model_sum_ms", "alone_sum_ms", "whole_ms", "in_model_ratio",
                    "alone_ratio"):
            assert len(fig[key]) == len(sizes) and all(finite(x) and x > 0 for x in fig[key]), \
                (name, key, fig[key])
        prof = load_profile(out / fig["profile"])
        assert prof.microbatch_sizes == sizes and prof.layers[0].bwd_input_ms is not None
        assert load_profile(out / fig["alone_profile"]).how != prof.how

    # (c) the runner against the plain loop at every M and K
    cells = sections["overhead"]["cells"]
    assert {(c["microbatches"], c["stages"]) for c in cells} == {
        (m, k) for m in DRY_RUN.overhead_microbatches for k in DRY_RUN.overhead_stages}
    assert all(finite(c["overhead"]) and c["loop_ms"] > 0 and c["runner_ms"] > 0 for c in cells)

    # (d) every step measured and predicted, with and without recompute; calibrated too
    steps = sections["steps"]
    configs = steps["configs"]
    assert {(c["microbatches"], c["recompute"]) for c in configs} == {
        (m, r) for m in DRY_RUN.steps_microbatches for r in (False, True)}
    for c in configs:
        assert c["step_ms"] > 0 and c["predicted_ms"] > 0 and finite(c["error"])
        assert finite(c["calibrated_error"])
    assert steps["profile"] == "section profiler" and finite(steps["median_abs_error"])
    assert steps["cuts"] == [0, 2, 3, 4, 6]  # gpt-tiny's 6 layers in 4 segments
    written = json.loads((out / steps["steps_file"]).read_text())  # the reference's format
    assert written["format"] == "gpipe-steps/0" and len(written["steps"]) == len(configs)
    assert len(list(out.iterdir())) <= 8  # what a GPU machine's $OUT brings back

    summary = (out / "summary.txt").read_text()
    assert all(f"{name}: ok" in summary for name in SECTIONS), summary


@pytest.mark.timeout(120)
def test_a_tiny_budget_skips_every_section_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_check(tmp_path, "--dry-run", "--out", str(out), "--budget-s", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    sections = json.loads((out / "gpu_check.json").read_text())["sections"]
    assert list(sections) == list(SECTIONS)
    for name, fig in sections.items():
        assert fig["status"] == "skipped" and fig["reason"].startswith("skipped: budget"), name
    assert "transparency: skipped - skipped: budget" in (out / "summary.txt").read_text()


@pytest.mark.timeout(120)
def test_bad_arguments_are_refused_with_the_fix(tmp_path: Path) -> None:
    result = run_check(tmp_path, "--dry-run", "--budget-s", "-1", "--sections", "nope",
                       "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "--budget-s -1: the budget must be a positive number of seconds" in result.stderr
    assert "--sections 'nope': nope not among them; name one or more of transparency" \
        in result.stderr
    if not torch.cuda.is_available():  # a GPU run on a machine without CUDA
        result = run_check(tmp_path, "--out", str(tmp_path / "out"))
        assert result.returncode == 2
        assert "needs CUDA, which this machine lacks" in result.stderr
        assert "pass --dry-run" in result.stderr


def test_a_failing_section_keeps_its_traceback_and_the_others_run(tmp_path: Path) -> None:
    report = Report(tmp_path, {"mode": "test"})
    check = Check(DRY_RUN, torch.device("cpu"), tmp_path)
    budget = Budget(100.0)

    def broken(sec: Section, _: Check) -> None:
        sec.figures["before"] = 1
        raise RuntimeError("boom")

    def fine(sec: Section, _: Check) -> None:
        assert sec.fits("a piece", 1.0)
        assert not sec.fits("a piece too big", 1e6)
        sec.figures["after"] = 2

    report.run("first", broken, check, budget, 1.0)
    report.run("second", fine, check, budget, 1.0)
    report.run("third", fine, check, budget, 1e6)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert saved["first"]["status"] == "error" and saved["first"]["before"] == 1
    assert "RuntimeError: boom" in saved["first"]["traceback"]
    assert saved["second"]["status"] == "partial" and saved["second"]["after"] == 2
    assert saved["second"]["skipped"][0].startswith("a piece too big: skipped: budget")
    assert saved["third"] == {"status": "skipped", "reason": saved["third"]["reason"]}
    assert saved["third"]["reason"].startswith("skipped: budget (section third needs")
