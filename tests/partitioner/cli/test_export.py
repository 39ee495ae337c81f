"""``partition-model export-schedule``: the files it writes, its refusals, and torch's own loader
training with them on two gloo ranks (loss and gradients equal plain training).

Torch 2.13 (``_PipelineScheduleRuntime._load_csv``) accepts every schedule the project makes:
1F1B, interleaved (V=2, stage s on rank s mod R), ZB-H1 (I and W) and ZB-V (the V placement,
two adjacent stages on the middle rank, which torch passes locally). What it cannot run is a
plan whose micro-batches differ in size (B not a multiple of M): its PipelineStage infers the
shape of every message once, from micro-batch 0, and receives every micro-batch into buffers
of that shape; a smaller last micro-batch then fails on a shape mismatch or waits forever for
bytes that never come (seen with 1F1B, B=8, M=3: a gloo receive timeout). So the export
refuses such plans, as it refuses graph plans that send past the next stage (torch's runtime
sends between adjacent stages only).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from executor.distributed.spawn import spawn_local
from executor.runtime.pipeline import manual_plan
from partitioner.cli.export import torch_problems
from partitioner.cli.main import main
from partitioner.formats.plan import save_plan
from partitioner.formats.values import Message
from partitioner.schedule.torchcsv import from_torch_csv

LAYERS, WIDTH, B = 8, 6, 8
#: name, stage boundaries (uneven, as a plan makes them), M, V
CASES = [("1f1b", [0, 3, 8], 4, 1), ("interleaved", [0, 2, 3, 6, 8], 4, 2),
         ("interleaved", [0, 2, 4, 6, 8], 2, 2), ("zb-h1", [0, 5, 8], 4, 1),
         ("zbv", [0, 1, 4, 6, 8], 4, 2), ("gpipe", [0, 4, 8], 2, 1)]


def _model() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(*(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
                               for _ in range(LAYERS)))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, WIDTH, generator=g), torch.randn(B, WIDTH, generator=g)


def _export(tmp_path: Path, name: str, cuts: list[int], m: int, v: int,
            batch: int = B) -> tuple[int, Path]:
    plan = replace(manual_plan(cuts, m, batch, name), stages_per_rank=v)
    plan_path, out = tmp_path / f"{name}-{m}-{v}.json", tmp_path / f"{name}-{m}-{v}.csv"
    save_plan(plan, plan_path)
    return main(["export-schedule", str(plan_path), "--format", "torch-csv", "-o", str(out)]), out


def _torch_step(csv_text: str, cuts: list[int], m: int) -> dict[str, Any]:
    """One step of torch's runtime on this rank's stages (those its CSV row names)."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    rank, big_k = dist.get_rank(), len(cuts) - 1
    mine = [k for k, r in enumerate(from_torch_csv(csv_text).rank_of) if r == rank]
    model = _model()
    parts = {k: model[cuts[k]:cuts[k + 1]] for k in mine}
    stages = [PipelineStage(parts[k], k, big_k, torch.device("cpu")) for k in mine]
    schedule = _PipelineScheduleRuntime(stages, n_microbatches=m,
                                        loss_fn=nn.functional.mse_loss)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "schedule.csv"
        path.write_text(csv_text)
        schedule._load_csv(str(path))  # torch's loader: format="compute_only"
    x, y = _batch()
    losses: list[torch.Tensor] = []
    schedule.step(*([x] if 0 in mine else []),
                  **({"target": y, "losses": losses} if big_k - 1 in mine else {}))
    grads = {n: p.grad.clone() for part in parts.values()  # a slice keeps the model's names
             for n, p in part.named_parameters() if p.grad is not None}
    return {"losses": [float(loss.detach()) for loss in losses], "grads": grads}


def _torch_orders() -> dict[str, str]:
    """Torch's own multi-stage schedules as compute-only CSV text (its ``pipeline_order``)."""
    from torch.distributed.pipelining import (
        PipelineStage,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
        ScheduleZBVZeroBubble,
    )

    rank, out = dist.get_rank(), {}
    for cls, mine in ((ScheduleInterleaved1F1B, [rank, rank + 2]),
                      (ScheduleInterleavedZeroBubble, [rank, rank + 2]),
                      (ScheduleZBVZeroBubble, [rank, 3 - rank])):
        stages = [PipelineStage(nn.Linear(2, 2), k, 4, torch.device("cpu")) for k in mine]
        order = cls(stages, n_microbatches=4, loss_fn=nn.functional.mse_loss).pipeline_order
        out[cls.__name__] = "".join(",".join("" if a is None else str(a) for a in order[r])
                                    + "\n" for r in sorted(order))
    return out


def _ranks(cases: list[tuple[str, list[int], int]]) -> dict[str, Any]:
    return {"steps": [_torch_step(*case) for case in cases], "orders": _torch_orders()}


@pytest.mark.timeout(120)
def test_torch_loads_the_exported_csv_and_trains_like_plain_training(tmp_path: Path) -> None:
    cases = []
    for name, cuts, m, v in CASES:
        status, out = _export(tmp_path, name, cuts, m, v)
        assert status == 0
        cases.append((out.read_text(), cuts, m))
    results = spawn_local(_ranks, 2, (cases,), timeout_s=30, deadline_s=100)
    model, (x, y) = _model(), _batch()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    plain = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for i, (name, cuts, m, _) in enumerate(CASES):
        got = [r["steps"][i] for r in results]
        losses = [value for g in got for value in g["losses"]]
        assert len(losses) == m, name
        assert sum(losses) / m == pytest.approx(float(loss.detach()), rel=1e-5), name
        grads = {n: t for g in got for n, t in g["grads"].items()}
        assert set(grads) == set(plain), name
        where = f"{name} {cuts} M={m}"
        for n, ref in plain.items():
            torch.testing.assert_close(grads[n], ref, rtol=1e-5, atol=1e-7,
                                       msg=lambda text, at=f"{where}, {n}": f"{at}: {text}")
    # and the other way: torch's own schedules are valid schedules of ours
    for cls, text in results[0]["orders"].items():
        sched = from_torch_csv(text, cls)
        assert sched.stages == 4 and sched.ranks == 2 and sched.microbatches == 4, cls
    zbv = from_torch_csv(results[0]["orders"]["ScheduleZBVZeroBubble"])
    assert zbv.rank_of == (0, 1, 1, 0)


def test_text_and_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = replace(manual_plan([0, 2, 4, 6, 8], 4, B, "zbv"), stages_per_rank=2)
    save_plan(plan, tmp_path / "plan.json")
    capsys.readouterr()
    assert main(["export-schedule", str(tmp_path / "plan.json"), "--format", "text"]) == 0
    text = capsys.readouterr().out
    assert text == str(plan.build_schedule()) + "\n"
    assert main(["export-schedule", str(tmp_path / "plan.json")]) == 0
    csv_text = capsys.readouterr().out
    assert from_torch_csv(csv_text).actions == plan.build_schedule().actions
    status, _ = _export(tmp_path, "interleaved", [0, 2, 4, 6, 8], 4, 2)
    assert status == 0 and "stage k on rank [0, 1, 0, 1]" in capsys.readouterr().err


def test_refuses_what_torch_cannot_run(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    status, out = _export(tmp_path, "1f1b", [0, 3, 8], 3, 1, batch=8)
    err = capsys.readouterr().err
    assert status == 2 and not out.exists()
    assert "B=8 is not a multiple of M=3" in err and "from micro-batch 0" in err
    graph = replace(manual_plan([0, 3, 6, 8], 2, B),
                    messages={(0, 1): Message(("a",), 8.0, 8.0),
                              (0, 2): Message(("b",), 8.0, 8.0)})
    (problem,) = torch_problems(graph)
    assert "0->2" in problem and "adjacent stages only" in problem


def test_notes_what_the_csv_does_not_carry(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    save_plan(manual_plan([0, 3, 8], 2, B, "1f1b", "always"), tmp_path / "plan.json")
    assert main(["export-schedule", str(tmp_path / "plan.json")]) == 0
    assert "torch.utils.checkpoint" in capsys.readouterr().err
