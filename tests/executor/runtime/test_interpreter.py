"""The action interpreter: its dispatch table, loss weighting, and re-materialisation that
replays the random state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from executor.runtime.interpreter import Interpreter, StepData
from executor.runtime.pipeline import Pipeline, manual_plan
from executor.runtime.stage import RngState, Stage
from partitioner.schedule.generators import gpipe
from partitioner.schedule.ir import Action, lower
from tests import toy_models as em


def one_stage(recompute: bool = False) -> Interpreter:
    return Interpreter(Stage(0, [(0, em.mlp_layer(0)), (1, nn.Linear(16, 4))], "cpu",
                             recompute), 1, transport=None)


def test_dispatch_table_covers_the_ir_and_rejects_the_rest() -> None:
    interp = one_stage()
    assert set(interp.handlers) == {"F", "B", "I", "W", "SF", "RF", "SB", "RB"}
    with pytest.raises(ValueError, match="kind 'X' has no handler; the executor runs kinds F, B"):
        interp.run(Action("X", 0, 0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="belongs to stage 1"):
        interp.run(Action("F", 1, 0))


def test_a_schedule_out_of_order_is_an_error_naming_the_action() -> None:
    interp = one_stage()
    x, y = em.mlp_batch(4)
    interp.begin(StepData.split(x, y, 2, nn.functional.mse_loss))
    with pytest.raises(RuntimeError, match="action 0B1: the forward state of micro-batch 1"):
        interp.run(Action("B", 0, 1))
    interp.run(Action("F", 0, 0))
    with pytest.raises(RuntimeError, match="backwards not run: micro-batches \\[0\\]"):
        interp.end()


def test_loss_is_the_batch_mean_with_uneven_microbatches() -> None:
    interp = one_stage()
    x, y = em.mlp_batch(7)
    data = StepData.split(x, y, 3, nn.functional.mse_loss)
    assert data.sizes == [3, 2, 2]
    interp.begin(data)
    for a in lower(gpipe(1, 3)).actions[0]:
        interp.run(a)
    loss = interp.end().loss
    assert loss is not None
    model = interp.stage.module
    assert float(loss) == pytest.approx(float(nn.functional.mse_loss(model(x), y).detach()), rel=1e-6)
    # the mean of the micro-batch losses would differ: the weights b_i / B matter here
    unweighted = sum(float(nn.functional.mse_loss(model(a), b).detach()) for a, b in
                     zip(x.split([3, 2, 2]), y.split([3, 2, 2]), strict=True)) / 3
    assert abs(unweighted - float(loss)) > 1e-4


def _dropout_run(recompute: str) -> dict[str, torch.Tensor]:
    model = em.gpt(p_drop=0.3)
    pipe = Pipeline(model, manual_plan([0, 2, 5], 3, 8, "1f1b", recompute))
    torch.manual_seed(5)
    ids, targets = em.gpt_batch(8)
    pipe.train_step(ids, targets, em.lm_loss)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_recompute_replays_dropout_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    kept = _dropout_run("never")
    for mode in ("always", "except_last"):
        again = _dropout_run(mode)
        assert all(torch.equal(again[n], g) for n, g in kept.items()), mode
    # the check has teeth: replaying another random state than the forward's changes the masks
    other = RngState(torch.Generator().manual_seed(123).get_state(), None)
    monkeypatch.setattr(Stage, "rng_state", lambda self: other)
    drifted = _dropout_run("always")
    assert any(not torch.allclose(drifted[n], g) for n, g in kept.items())


# -- split backward: I leaves the linear layers' weight gradients to W -----------------------------

def _split_step(recompute: bool, kinds: str) -> tuple[Interpreter, list[torch.Tensor | None]]:
    """One stage, one micro-batch, backward split: run F, I (and W when ``kinds`` says so);
    the weight gradient of the first linear layer after each action."""
    interp = Interpreter(Stage(0, [(0, em.mlp_layer(0)), (1, nn.Tanh()), (2, nn.Linear(16, 4))],
                               "cpu", recompute), 1, transport=None, split=[0])
    x, y = em.mlp_batch(4)
    interp.begin(StepData.split(x, y, 1, nn.functional.mse_loss))
    seen = []
    for kind in kinds:
        interp.run(Action(kind, 0, 0))  # type: ignore[arg-type]
        weight = interp.stage.module[0].weight.grad
        seen.append(None if weight is None else weight.clone())
    return interp, seen


@pytest.mark.parametrize("recompute", [False, True])
def test_input_gradient_then_weight_gradient_equals_the_full_backward(recompute: bool) -> None:
    interp, seen = _split_step(recompute, "FIW")
    assert seen[1] is None  # after I: the weight gradient waits for W ...
    interp.end()
    plain = Stage(0, [(0, em.mlp_layer(0)), (1, nn.Tanh()), (2, nn.Linear(16, 4))], "cpu")
    plain.module[2].load_state_dict(interp.stage.module[2].state_dict())
    x, y = em.mlp_batch(4)
    nn.functional.mse_loss(plain(x), y).backward()
    for got, want in zip(interp.stage.parameters(), plain.parameters(), strict=True):
        assert got.grad is not None and want.grad is not None
        assert torch.allclose(got.grad, want.grad, rtol=1e-6, atol=1e-7)  # ... and W gives it


def test_a_weight_gradient_never_run_or_a_split_the_stage_was_not_told_of_is_an_error() -> None:
    interp, _ = _split_step(False, "FI")
    with pytest.raises(RuntimeError, match=r"weight gradients not run: micro-batches \[0\]"):
        interp.end()
    interp, _ = _split_step(False, "F")
    with pytest.raises(RuntimeError, match="action 0W0: the deferred weight-gradient work"):
        interp.run(Action("W", 0, 0))
    plain = one_stage()
    x, y = em.mlp_batch(4)
    plain.begin(StepData.split(x, y, 1, nn.functional.mse_loss))
    plain.run(Action("F", 0, 0))
    with pytest.raises(RuntimeError, match=r"not among the split ones .* give the interpreter "
                                           r"split="):
        plain.run(Action("I", 0, 0))
