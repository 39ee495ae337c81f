"""The paper's two workloads: pipelined training on data in their on-disk layouts lowers the loss."""

from pathlib import Path

import pytest
import torch

from executor.distributed.spawn import spawn_local
from executor.runtime.job import Job
from executor.runtime.pipeline import Pipeline, manual_plan
from executor.workloads import jobs
from executor.workloads.datasets import write_synthetic_image_folder, write_synthetic_parallel_text

REPO = Path(__file__).resolve().parents[3]


def _train(job: Job, steps: int, batch: int, microbatches: int) -> list[float]:
    """Train the job's model with a 2-stage GPipe plan in one process; the loss per step."""
    model = torch.nn.Sequential(*job.layers(0, job.num_layers))  # type: ignore[call-arg]
    plan = manual_plan([0, job.num_layers // 2, job.num_layers], microbatches, batch)
    pipe = Pipeline(model, plan)
    assert job.optimizer is not None
    opt = job.optimizer(pipe.parameters())
    losses = []
    for step in range(steps):
        inputs, targets = job.batch(step, batch)
        opt.zero_grad()
        losses.append(float(pipe.train_step(inputs, targets, job.loss_fn)))
        opt.step()
    return losses


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GPIPE_DATA", str(tmp_path))
    jobs._data_dir.cache_clear()
    yield tmp_path  # type: ignore[misc]
    jobs._data_dir.cache_clear()


@pytest.mark.timeout(120)
def test_translation_job_learns(data_dir: Path) -> None:
    write_synthetic_parallel_text(data_dir, sentences=64)
    losses = _train(jobs.translation(), steps=25, batch=8, microbatches=3)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


@pytest.mark.timeout(120)
def test_image_job_learns(data_dir: Path) -> None:
    write_synthetic_image_folder(data_dir, classes=4, per_class=8, image_size=64)
    losses = _train(jobs.images(), steps=25, batch=8, microbatches=2)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def _rank_losses(plan_path: str, steps: int) -> list[float]:
    from executor.distributed.launch import run_rank

    return list(run_rank("executor.workloads.jobs:translation", plan_path, steps, None, "cpu", 60.0)
                ["losses"])


@pytest.mark.timeout(180)
def test_translation_job_learns_on_two_ranks(data_dir: Path, tmp_path: Path) -> None:
    from partitioner.formats.plan import save_plan

    write_synthetic_parallel_text(data_dir, sentences=64)
    job = jobs.translation()
    plan = manual_plan([0, 4, job.num_layers], 4, 8, schedule="1f1b")
    save_plan(plan, tmp_path / "plan.json")
    losses = spawn_local(_rank_losses, 2, (str(tmp_path / "plan.json"), 20))[-1]
    assert len(losses) == 20 and losses[-1] < 0.6 * losses[0], losses
