"""The launcher: local CPU ranks it spawns itself, torchrun, and its errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from executor.launch import Job, demo_job, load_job, main
from executor.pipeline import manual_plan
from partitioner.plan import save_plan
from partitioner.timeline import load_chrome_trace


@pytest.fixture
def plan_path(tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    save_plan(manual_plan([0, 3, 7], 4, 16, "1f1b", "except_last"), path)
    return path


@pytest.mark.timeout(120)
def test_spawns_local_ranks_and_writes_the_measured_trace(
        plan_path: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "measured.json"
    assert main(["--plan", str(plan_path), "--steps", "3", "--trace", str(trace)]) == 0
    out = capfd.readouterr().out
    assert "step 2: loss" in out and "trained 3 steps on 2 local ranks" in out
    tl = load_chrome_trace(trace)
    assert tl.kind == "measured" and tl.stages == 2
    assert sum(e.action.kind in "FB" for e in tl.events) == 2 * 2 * 4


@pytest.mark.timeout(120)
def test_runs_under_torchrun(plan_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           "-m", "executor.launch", "--plan", str(plan_path), "--steps", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step 1: loss" in done.stdout


def test_errors_before_starting_ranks(plan_path: Path) -> None:
    assert isinstance(demo_job(), Job)
    with pytest.raises(ValueError, match="not of the form module:function"):
        load_job("executor.launch")
    with pytest.raises(ValueError, match="cannot load it"):
        load_job("executor.launch:nothing_here")
    with pytest.raises(TypeError, match=r"returned Plan, not an executor\.launch\.Job"):
        load_job("test_launch:_not_a_job")
    with pytest.raises(ValueError, match="train at least one step"):
        main(["--plan", str(plan_path), "--steps", "0"])
    with pytest.raises(ValueError, match="without torchrun the ranks are local CPU processes"):
        main(["--plan", str(plan_path), "--device", "cuda:0"])


def _not_a_job() -> object:
    return manual_plan([0, 1], 1, 1)
