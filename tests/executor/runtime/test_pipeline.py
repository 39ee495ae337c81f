"""Pipeline, the library API: plans in every form, the user's optimizer, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from executor import Pipeline, manual_plan
from executor.runtime.pipeline import as_plan
from partitioner.formats.plan import PlanError, plan_to_dict, save_plan
from tests import toy_models as em


def test_optimizer_from_model_parameters_trains_through_the_pipeline(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, plain = em.mlp(), em.mlp()
    plan = manual_plan([0, 3, 7], 4, 8, "1f1b", "except_last")
    save_plan(plan, tmp_path / "plan.json")
    pipe = Pipeline(model, tmp_path / "plan.json")  # a path
    x, y = em.mlp_batch(8)
    opt, opt_plain = (torch.optim.Adam(m.parameters(), lr=0.01) for m in (model, plain))
    for _ in range(3):
        for o in (opt, opt_plain):
            o.zero_grad()
        loss = pipe.train_step(x, y, nn.functional.mse_loss)
        ref = nn.functional.mse_loss(plain(x), y)
        ref.backward()
        opt.step()
        opt_plain.step()
        assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-5)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert pipe.last_timeline is not None and pipe.last_timeline.stages == 2


def test_plan_as_object_dict_or_path(tmp_path: Path) -> None:
    plan = manual_plan([0, 2, 7], 2, 8)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(plan_to_dict(plan)))
    assert as_plan(plan) is plan
    assert as_plan(plan_to_dict(plan)).stages == as_plan(str(path)).stages == plan.stages
    with pytest.raises(TypeError, match="plan must be a Plan, a dict or a path"):
        as_plan(3)  # type: ignore[arg-type]


def test_recompute_modes_per_stage() -> None:
    """The stages recompute as the partitioner's one rule says (schedule.recompute)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
    flags = {mode: [s.recompute for s in Pipeline(model, manual_plan(
        [0, 1, 2, 3], 1, 1, recompute=mode)).stages] for mode in ("never", "always", "except_last")}
    assert flags == {"never": [False] * 3, "always": [True] * 3,
                     "except_last": [True, True, False]}


def test_tuple_inputs_and_integer_ids_on_forward_only() -> None:
    model = em.gpt()
    pipe = Pipeline(model, manual_plan([0, 2, 5], 3, 8))
    ids, _ = em.gpt_batch(8)
    with torch.no_grad():
        torch.testing.assert_close(pipe(ids), model(ids))
    two = nn.Sequential(em.seeded(lambda i: nn.Bilinear(3, 2, 4))(0))
    wrapped = nn.Sequential(_Unpack(two[0]), nn.Tanh())
    pipe2 = Pipeline(wrapped, manual_plan([0, 1, 2], 2, 5))
    a, b = torch.randn(5, 3), torch.randn(5, 2)
    with torch.no_grad():
        torch.testing.assert_close(pipe2((a, b)), wrapped((a, b)))


class _Unpack(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.inner(*x)
        return out


def test_errors_name_the_problem_before_any_work() -> None:
    model = em.mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        Pipeline("a model", manual_plan([0, 1], 1, 1))  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="covers 6 layers but the model has 7"):
        Pipeline(model, manual_plan([0, 3, 6], 2, 8))
    with pytest.raises(ValueError, match=r"'cuda:3'.*(does not exist|lacks)"):
        Pipeline(model, manual_plan([0, 3, 7], 2, 8, devices=["cpu", "cuda:3"]))
    with pytest.raises(ValueError, match="3 devices given for K=2"):
        Pipeline(model, manual_plan([0, 3, 7], 2, 8), devices=["cpu"] * 3)
    with pytest.raises(ValueError, match="not a torch device name"):
        Pipeline(model, manual_plan([0, 3, 7], 2, 8), devices=["cpu", "gpu7"])
    pipe = Pipeline(model, manual_plan([0, 3, 7], 4, 8))
    with pytest.raises(ValueError, match="B=3 samples but the plan splits it into M=4"):
        pipe.train_step(*em.mlp_batch(3), nn.functional.mse_loss)
    with pytest.raises(ValueError, match="inputs have batch size 8 but targets 5"):
        pipe.train_step(em.mlp_batch(8)[0], em.mlp_batch(5)[1], nn.functional.mse_loss)
    with pytest.raises(TypeError, match="inputs must be a tensor or a tuple of tensors"):
        pipe.train_step("x", em.mlp_batch(8)[1], nn.functional.mse_loss)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss function must return a scalar"):
        pipe.train_step(*em.mlp_batch(8), lambda out, y: out - y)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), q)  # nothing was trained
    with pytest.raises(ValueError, match="boundaries"):
        manual_plan([0, 3, 3], 2, 8)


def test_stages_must_cover_every_layer_exactly_once() -> None:
    """A graph-shaped or hand-edited plan whose stages' spans overlap would run layers twice:
    refused before any work, whatever its nodes say."""
    model = em.mlp()  # 7 layers
    data = plan_to_dict(manual_plan([0, 3, 7], 2, 4))
    data["stages"] = [{"layers": [0, 7], "device": "cpu", "nodes": [0, 1, 2, 6]},
                      {"layers": [3, 6], "device": "cpu", "nodes": [3, 4, 5]}]
    with pytest.raises(PlanError, match=r"stage 0 holds layers \[0, 1, 2, 6\], which are not "
                                        r"one contiguous range"):
        Pipeline(model, data)
    data["stages"] = [{"layers": [0, 4], "device": "cpu", "nodes": [0, 1, 2, 3]},
                      {"layers": [4, 7], "device": "cpu", "nodes": [4, 5, 6]}]
    assert Pipeline(model, data).plan.layer_ranges() == [(0, 4), (4, 7)]  # ranges: it runs
    data["stages"] = [{"layers": [0, 7], "device": "cpu"}, {"layers": [2, 6], "device": "cpu"}]
    with pytest.raises(PlanError, match="without overlap or gap"):  # the loader says it first
        Pipeline(model, data)


def test_tied_parameters_split_across_stages_are_refused() -> None:
    embed, head = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)
    head.weight = embed.weight  # a language model's tied input and output embedding
    model = nn.Sequential(embed, nn.Tanh(), nn.Linear(8, 8), head)
    with pytest.raises(PlanError, match=r"parameter '0\.weight' is used by layers \[0, 3\], "
                                        r"which the plan puts on stages \[0, 1\]"):
        Pipeline(model, manual_plan([0, 2, 4], 2, 4))
    ids = torch.randint(16, (4, 3))
    pipe = Pipeline(model, manual_plan([0, 4], 2, 4))  # one stage holds both users: fine
    loss = pipe.train_step(ids, ids, lambda out, y: nn.functional.cross_entropy(
        out.flatten(0, 1), y.flatten()))
    assert torch.isfinite(loss) and embed.weight.grad is not None


def test_building_a_pipeline_leaves_the_allocator_alone() -> None:
    """The C allocator setting is process-wide: only an explicit switch may change it."""
    code = (
        "import torch; from executor import Pipeline, manual_plan\n"
        "from executor.runtime import allocator\n"
        "m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))\n"
        "Pipeline(m, manual_plan([0, 1, 2], 1, 1))\n"
        "before = allocator.keep_freed_memory.cache_info().misses\n"
        "Pipeline(m, manual_plan([0, 1, 2], 1, 1), keep_freed_memory=True)\n"
        "print(before, allocator.keep_freed_memory.cache_info().misses)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "1"]


def test_a_plan_with_replicas_is_refused_by_the_local_runner() -> None:
    from dataclasses import replace

    from executor.graphs.pipeline import Pipeline as AnyPipeline
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    plan = replace(manual_plan([0, 1, 2], 2, 8), replicas=2)
    for make in (Pipeline, AnyPipeline):
        with pytest.raises(ValueError, match=r"replicas=2 .* on 4 ranks.*partition-model run"):
            make(model, plan)
