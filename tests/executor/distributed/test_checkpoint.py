"""Checkpoints: a killed run resumed under its own plan repeats the uninterrupted losses bit for
bit; under another plan (other cuts, K, schedule, D) within 1e-6; partial and damaged ones are
refused, naming the file."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from executor.distributed.checkpoint import FORMAT, MANIFEST, load_checkpoint
from executor.distributed.runner import DistributedRunner
from executor.distributed.spawn import RankFailure, spawn_local
from executor.runtime.pipeline import manual_plan
from executor.workloads.jobs import demo
from partitioner.cli.main import main
from partitioner.formats.plan import Plan, save_plan

JOB = "tests.toy_models:dying_demo_job"  # the demo MLP with Adam: optimizer state to carry


def _plan(tmp: Path, name: str, plan: Plan) -> str:
    path = tmp / f"{name}.json"
    save_plan(plan, path)
    return str(path)


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def _load_rank(plan: str, ckpt: str) -> int:
    """On each spawned rank: the demo job's runner and optimizer, loaded from ``ckpt`` with
    the ranks' own check (rank 0 hashes the files, every rank hears the verdict)."""
    job = demo()
    runner = DistributedRunner(job.layers, plan, num_layers=job.num_layers, timeout_s=30)
    assert job.optimizer is not None
    return load_checkpoint(ckpt, runner, runner.make_optimizer(job.optimizer))


def _run(plan: str, steps: int, metrics: Path, *more: str) -> int:
    return main(["run", "--job", JOB, "--plan", plan, "--steps", str(steps),
                 "--metrics", str(metrics), *more])


@pytest.mark.timeout(240)
def test_a_killed_run_resumes_with_the_uninterrupted_losses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
        ) -> None:
    plan = _plan(tmp_path, "k2", manual_plan([0, 3, 7], 4, 16, "1f1b", "except_last"))
    assert _run(plan, 6, tmp_path / "whole.jsonl") == 0
    whole = _losses(tmp_path / "whole.jsonl")
    ckpt = tmp_path / "ckpt"
    monkeypatch.setenv("GPIPE_TEST_DIE_AT", "4")  # rank 1 is killed drawing step 4's batch
    assert _run(plan, 6, tmp_path / "cut.jsonl", "--checkpoint-dir", str(ckpt),
                "--checkpoint-every", "2") == 2
    assert "killed by signal SIGKILL" in capfd.readouterr().err
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000002", "step-00000004"]
    manifest = json.loads((ckpt / "step-00000004" / MANIFEST).read_text())
    assert manifest["format"] == FORMAT and manifest["step"] == 4
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= set(manifest["files"])
    monkeypatch.delenv("GPIPE_TEST_DIE_AT")
    assert _run(plan, 6, tmp_path / "cut.jsonl", "--resume", str(ckpt)) == 0
    assert "trained steps 4..5" in capfd.readouterr().out
    assert _losses(tmp_path / "cut.jsonl") == whole  # bit for bit, steps 0-3 then 4-5


@pytest.mark.timeout(300)
@pytest.mark.parametrize("other", ["cuts_and_schedule", "three_stages", "replicas_sharded"])
def test_another_plan_continues_from_the_same_state(tmp_path: Path, other: str) -> None:
    first = _plan(tmp_path, "k2", manual_plan([0, 3, 7], 4, 16, "1f1b", "except_last"))
    then = {"cuts_and_schedule": manual_plan([0, 5, 7], 4, 16, "gpipe", "never"),
            "three_stages": manual_plan([0, 2, 4, 7], 4, 16, "zb-h1", "always"),
            "replicas_sharded": dataclasses.replace(manual_plan([0, 7], 2, 16),
                                                    replicas=2, shard_optimizer=True)}[other]
    assert _run(first, 6, tmp_path / "whole.jsonl") == 0
    ckpt = tmp_path / "ckpt"
    assert _run(first, 3, tmp_path / "cut.jsonl", "--checkpoint-dir", str(ckpt)) == 0
    assert _run(_plan(tmp_path, other, then), 6, tmp_path / "cut.jsonl", "--resume",
                str(ckpt / "step-00000003")) == 0
    whole, cut = _losses(tmp_path / "whole.jsonl"), _losses(tmp_path / "cut.jsonl")
    assert len(cut) == 6 and cut[:3] == whole[:3]
    for a, b in zip(cut[3:], whole[3:], strict=True):
        assert math.isclose(a, b, rel_tol=1e-6), (other, cut, whole)


@pytest.mark.timeout(180)
def test_partial_and_damaged_checkpoints_are_refused(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    plan = _plan(tmp_path, "k2", manual_plan([0, 3, 7], 4, 16, "1f1b", "except_last"))
    ckpt = tmp_path / "ckpt"
    (ckpt / ".step-00000002.partial").mkdir(parents=True)  # a save that died
    assert _run(plan, 4, tmp_path / "m.jsonl", "--resume", str(ckpt)) == 2
    assert "no checkpoint in" in capfd.readouterr().err
    assert _run(plan, 2, tmp_path / "m.jsonl", "--checkpoint-dir", str(ckpt)) == 0
    assert spawn_local(_load_rank, 2, (plan, str(ckpt)), timeout_s=60) == [2, 2]
    data = next(p for p in (ckpt / "step-00000002").iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:-1] + bytes([data.read_bytes()[-1] ^ 1]))
    capfd.readouterr()
    assert _run(plan, 4, tmp_path / "m.jsonl", "--resume", str(ckpt)) == 2
    err = capfd.readouterr().err
    assert f"is damaged: {data.name} does not match its sha256" in err
    with pytest.raises(RankFailure) as info:  # checked inside the ranks too (torchrun's way)
        spawn_local(_load_rank, 2, (plan, str(ckpt)), timeout_s=60)
    assert str(info.value).count(f"is damaged: {data.name}") >= 2  # rank 0 checks, all say
    with pytest.raises(SystemExit) as info:
        main(["run", "--plan", plan, "--checkpoint-every", "2"])
    assert info.value.code == 2 and "needs --checkpoint-dir" in capfd.readouterr().err
