"""The local runner: transparency against the plain model for every K, M, recompute and
schedule (fixed, several stages per rank, split backward, list-scheduled), and the measured
timeline it records."""

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
from partitioner.schedule.generators import gpipe, zb_h1
from partitioner.schedule.ir import lower
from tests import toy_models as em
from tests.synthetic import listed_schedule, schedule_from_rows

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


def schedules(stages: int) -> list[tuple[str, dict[str, Any]]]:
    """Every schedule that K stages allow, as ``manual_plan`` takes them."""
    out: list[tuple[str, dict[str, Any]]] = [("gpipe", {}), ("1f1b", {}), ("zb-h1", {})]
    if stages % 2 == 0:
        out += [("interleaved", {"stages_per_rank": 2}), ("zbv", {})]
    return [*out, ("listed", {"actions": listed_schedule(stages, SPLIT_M)})]


SPLIT_B, SPLIT_M = 7, 3  # uneven micro-batches: 3, 2, 2


@pytest.mark.parametrize("name", list(MODELS))
def test_every_schedule_is_transparent(name: str) -> None:
    # one step of each: loss, every gradient and the forward against the plain model
    build, batch, loss_fn = MODELS[name]
    plain = build()
    x, y = batch(SPLIT_B)
    loss0 = _backward(loss_fn(plain(x), y))
    want = {n: p.grad for n, p in plain.named_parameters()}
    with torch.no_grad():
        out0 = plain(x)
    failures = []
    for stages, recompute in itertools.product((1, 2, 3, 4), ("never", "always", "except_last")):
        for schedule, extra in schedules(stages):
            where = f"{name} K={stages} {schedule} {recompute}"
            model = build()
            cuts = [round(k * len(model) / stages) for k in range(stages + 1)]
            pipe = Pipeline(model, manual_plan(cuts, SPLIT_M, SPLIT_B, schedule, recompute,
                                               **extra))
            loss = pipe.train_step(x, y, loss_fn)
            kinds = {a.kind for a in pipe.runner.order}
            split = schedule in ("zb-h1", "zbv") or (schedule == "listed" and stages != 3)
            if ({"I", "W"} <= kinds) != split or ("B" in kinds) == split:
                failures.append(f"{where}: ran kinds {sorted(kinds)}")
            if float(loss) != pytest.approx(float(loss0.detach()), rel=1e-5):
                failures.append(f"{where}: loss {float(loss)} vs {float(loss0.detach())}")
            failures += [f"{where}: gradient of {n}" for n, p in model.named_parameters()
                         if p.grad is None or not close(p.grad, want[n])]
            with torch.no_grad():
                if not close(torch.as_tensor(pipe(x)), out0):
                    failures.append(f"{where}: forward")
    assert not failures, "\n".join(failures)


def test_a_schedule_object_runs_as_given_and_must_fit() -> None:
    layers = [(0, nn.Linear(4, 4)), (1, nn.Linear(4, 1))]
    stages = [Stage(0, layers[:1], "cpu"), Stage(1, layers[1:], "cpu")]
    runner = LocalRunner(stages, zb_h1(2, 3))
    assert runner.microbatches == 3 and runner.schedule.split == zb_h1(2, 3).split
    runner.train_step(torch.ones(5, 4), torch.zeros(5, 1), nn.MSELoss())
    with pytest.raises(ValueError, match="it has K=3 stages but the runner 2"):
        LocalRunner(stages, zb_h1(3, 3))
    with pytest.raises(ValueError, match="it has M=3 micro-batches but the runner was given M=4"):
        LocalRunner(stages, zb_h1(2, 3), 4)
    with pytest.raises(ValueError, match="needs the number of micro-batches"):
        LocalRunner(stages, "zb-h1")


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
