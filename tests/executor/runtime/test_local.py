"""The local runner: transparency against the plain model for every K, M, recompute and
schedule, and the measured timeline it records."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import nn

from executor.runtime.local import LocalRunner, run_order
from executor.runtime.pipeline import Pipeline, manual_plan
from executor.runtime.stage import Stage
from partitioner.formats.timeline import Timeline
from partitioner.schedule.generators import gpipe
from partitioner.schedule.ir import lower
from tests import toy_models as em
from tests.synthetic import schedule_from_rows

B, STEPS, LR = 8, 5, 0.1
CONFIGS = list(itertools.product((1, 2, 3, 5, 8), ("never", "always", "except_last"),
                                 ("gpipe", "1f1b")))
MODELS: dict[str, tuple[Any, Any, Any]] = {
    "mlp": (em.mlp, em.mlp_batch, nn.functional.mse_loss),
    "gpt": (em.gpt, em.gpt_batch, em.lm_loss),
}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs would cost more than the work
    yield
    torch.set_num_threads(threads)


def train(model: nn.Module, step: Any, batch: tuple[Any, Any]) -> dict[str, Any]:
    """STEPS SGD steps through ``step(x, y) -> loss``: first loss and grads, final params."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out: dict[str, Any] = {}
    for i in range(STEPS):
        opt.zero_grad()
        loss = step(*batch)
        if i == 0:
            out["loss"] = float(loss.detach())
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return float((a - b).norm()) <= rtol * max(float(b.norm()), 1e-12)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_transparent_against_the_plain_model(name: str, stages: int) -> None:
    build, batch, loss_fn = MODELS[name]
    plain = build()
    oracle = train(plain, lambda x, y: _backward(loss_fn(plain(x), y)), batch(B))
    num_layers = len(plain)
    for m, recompute, schedule in CONFIGS:
        where = f"{name} K={stages} M={m} {recompute} {schedule}"
        model = build()
        cuts = [round(k * num_layers / stages) for k in range(stages + 1)]
        pipe = Pipeline(model, manual_plan(cuts, m, B, schedule, recompute))
        got = train(model, lambda x, y, p=pipe: p.train_step(x, y, loss_fn), batch(B))
        assert got["loss"] == pytest.approx(oracle["loss"], rel=1e-5), where
        for n, g in oracle["grads"].items():
            assert close(got["grads"][n], g), f"{where}: gradient of {n}"
            assert close(got["params"][n], oracle["params"][n]), f"{where}: {n} after steps"
        with torch.no_grad():
            assert close(torch.as_tensor(pipe(batch(B)[0])), plain(batch(B)[0])), where


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss


def test_run_order_follows_the_schedule_clock() -> None:
    sched = lower(gpipe(2, 2))
    order = run_order(sched)
    assert [str(a) for a in order[:4]] == ["0F0", "0SF0", "0F1", "1RF0"]
    assert sorted(map(str, order)) == sorted(str(a) for row in sched.actions for a in row)
    with pytest.raises(ValueError, match="deadlock"):
        run_order(schedule_from_rows("bad", [["0F0", "0RB0", "0B0", "0SF0"],
                                    ["1RF0", "1F0", "1B0", "1SB0"]]))


def test_timeline_records_every_action_in_order() -> None:
    layers = [(0, em.Sleep(5.0)), (1, em.Sleep(5.0))]
    runner = LocalRunner([Stage(0, layers[:1], "cpu"), Stage(1, layers[1:], "cpu")], "gpipe", 3)
    x = torch.randn(6, 2)
    _, tl = runner.train_step(x, x, nn.functional.mse_loss)
    assert isinstance(tl, Timeline) and tl.kind == "measured"
    assert [str(e.action) for e in sorted(tl.events, key=lambda e: e.start_ms)] == \
        [str(a) for a in runner.order]
    forwards = [e for e in tl.events if e.action.kind == "F"]
    assert all(e.duration_ms >= 4.5 for e in forwards)
    assert tl.step_ms >= 6 * 5.0  # 6 sleeping forwards, one after another
    assert Timeline.from_chrome_trace(tl.to_chrome_trace()).stages == 2
    out, tl_fwd = runner.forward(x)
    assert torch.equal(out, x) and {e.action.kind for e in tl_fwd.events} == {"F", "SF", "RF"}
