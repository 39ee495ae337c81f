"""The launcher: local CPU ranks it spawns itself, torchrun, and its errors."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from executor.distributed.launch import launch
from executor.runtime.job import Job, load_job
from executor.runtime.pipeline import manual_plan
from executor.workloads.jobs import demo
from partitioner.cli.main import main
from partitioner.formats.plan import save_plan
from partitioner.formats.timeline import load_chrome_trace


@pytest.fixture
def plan_path(tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    save_plan(manual_plan([0, 3, 7], 4, 16, "1f1b", "except_last"), path)
    return path


@pytest.mark.timeout(120)
def test_spawns_local_ranks_and_writes_the_measured_trace(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # interleaved, two stages per rank: K=4 stages on R=2 ranks
    plan_path = tmp_path / "interleaved.json"
    save_plan(manual_plan([0, 2, 4, 5, 7], 4, 16, "interleaved", "except_last",
                          stages_per_rank=2), plan_path)
    trace = tmp_path / "measured.json"
    assert main(["run", "--plan", str(plan_path), "--steps", "3", "--trace", str(trace)]) == 0
    out = capfd.readouterr().out
    assert "step 2: loss" in out and "trained 3 steps on 2 local ranks" in out
    tl = load_chrome_trace(trace)
    assert tl.kind == "measured" and tl.stages == 4
    assert sum(e.action.kind in "FB" for e in tl.events) == 4 * 2 * 4


@pytest.mark.timeout(120)
def test_spawns_every_replica_and_writes_one_metrics_line_per_step(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # K=1 stage x D=2 replicas on 2 ranks (K=2 x D=2: tests/executor/distributed/
    # test_replicas.py), the optimizer sharded by the flag (off in the plan)
    path = tmp_path / "replicas.json"
    save_plan(dataclasses.replace(manual_plan([0, 7], 2, 16), replicas=2), path)
    metrics = tmp_path / "steps.jsonl"
    assert main(["run", "--plan", str(path), "--steps", "3", "--metrics", str(metrics),
                 "--shard-optimizer", "on"]) == 0
    out = capfd.readouterr().out
    assert "trained 3 steps on 2 local ranks" in out
    assert out.count("step 2: loss") == 1  # one rank speaks for every replica
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert all(line["loss"] > 0 and line["step_ms"] >= line["pipeline_ms"] > 0
               and line["samples"] == 16 for line in lines)


@pytest.mark.timeout(120)
def test_runs_under_torchrun(plan_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[3]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           "-m", "partitioner.cli", "run", "--plan", str(plan_path), "--steps", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step 1: loss" in done.stdout


def test_errors_before_starting_ranks(plan_path: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert isinstance(demo(), Job)
    with pytest.raises(ValueError, match="not of the form module:function"):
        load_job("executor.workloads")
    with pytest.raises(ValueError, match="has no 'nothing_here'"):
        load_job("executor.workloads.jobs:nothing_here")
    with pytest.raises(ValueError, match="cannot import module 'nowhere'"):
        load_job("nowhere:job")
    with pytest.raises(TypeError, match=r"returned Plan, not an executor\.runtime\.job\.Job"):
        load_job("tests.executor.distributed.test_launch:_not_a_job")
    with pytest.raises(ValueError, match="train at least one step"):
        launch("executor.workloads.jobs:demo", str(plan_path), steps=0)
    with pytest.raises(ValueError, match="without torchrun the ranks are local CPU processes"):
        launch("executor.workloads.jobs:demo", str(plan_path), device="cuda:0")
    save_plan(manual_plan([0, 3, 6], 4, 16), tmp_path / "short.json")
    assert main(["run", "--plan", str(tmp_path / "short.json")]) == 2  # 6 layers, not 7
    assert "the plan covers 6 layers but the model has 7" in capsys.readouterr().err


def _not_a_job() -> object:
    return manual_plan([0, 1], 1, 1)


@pytest.mark.timeout(120)
def test_a_failed_rank_is_one_message_and_exit_2(plan_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--job", "tests.toy_models:failing_job", "--plan", str(plan_path),
                 "--steps", "2", "--timeout-s", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("partition-model run: error:") and "Traceback" not in err
    assert "ranks failed; first cause: rank 1 raised RuntimeError: layer 5 broke" in err
