"""The activation meter, and the memory model against it: what the stages hold is predicted."""

import itertools

import pytest
import torch
from torch import nn

from executor.profiling.profiler import profile_model
from executor.runtime.interpreter import StepData
from executor.runtime.local import LocalRunner
from executor.runtime.memory import ActivationMeter
from executor.runtime.stage import Stage, build_layers
from partitioner.cost.model import CostModel
from partitioner.simulator.engine import simulate
from partitioner.solve.planner import make_plan


def test_views_of_one_storage_count_once_across_microbatches() -> None:
    meter = ActivationMeter(nn.Identity())
    meter.begin_step()
    whole = torch.zeros(8, 4)  # 128 bytes
    a, b = whole[:4], whole[4:]
    assert meter.hold(0, meter.storages(a)) == 128 and meter.live_bytes == 128
    meter.hold(1, meter.storages(b))
    assert meter.live_bytes == 128  # one storage, two holders
    assert meter.release(0) == 0 and meter.live_bytes == 128  # still held by micro-batch 1
    assert meter.release(1) == 128 and meter.live_bytes == 0 and meter.peak_bytes == 128


def test_batch_counts_its_own_bytes_and_not_again_when_saved() -> None:
    dataset = torch.zeros(100, 4)  # the batch is a view of a larger tensor
    batch = dataset[:8]
    layer = nn.Linear(4, 4)
    meter = ActivationMeter(layer)
    meter.begin_step(batch)
    assert meter.batch_bytes == 8 * 4 * 4 and meter.live_bytes == 128  # not the dataset's
    with meter.saving() as saved:
        out = torch.relu(layer(batch[:4]))  # the linear saves the batch view; relu its output
    assert meter.hold(0, meter.storages(batch[:4]), saved) == out.numel() * 4
    assert meter.peak_bytes == 128 + 64


def test_rebuild_adds_only_what_is_not_held_and_parameters_never_count() -> None:
    layer = nn.Linear(4, 4)
    meter = ActivationMeter(layer)
    meter.begin_step()
    x = torch.ones(2, 4, requires_grad=True)  # 32 bytes, the stash
    meter.hold(0, meter.storages(x))
    with meter.saving() as rebuilt:
        y = torch.tanh(layer(x))  # saves x (held already), the weight (a parameter), y
    assert meter.storages(layer.weight) == {}
    assert meter.rebuild(0, rebuilt) == y.numel() * 4
    assert meter.peak_bytes == 32 + 32 and meter.live_bytes == 32


def _plain() -> nn.Sequential:
    torch.manual_seed(0)  # ReLU and Tanh save their outputs, which the next Linear saves too
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(),
                         nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _model() -> nn.Sequential:
    """The plain MLP with a BatchNorm, whose backward saves its running statistics too (the
    module's buffers, which every micro-batch shares: state, not activations)."""
    model = _plain()
    return nn.Sequential(model[0], nn.BatchNorm1d(32), *model[1:])


LOSSES = {"mse": (nn.functional.mse_loss, lambda b: torch.randn(b, 4)),
          "cross_entropy": (nn.functional.cross_entropy, lambda b: torch.randint(4, (b,)))}


@pytest.fixture(scope="module", params=list(LOSSES))
def measured(request: pytest.FixtureRequest) -> tuple[object, str]:
    loss_fn, target = LOSSES[request.param]
    prof = profile_model(_model(), torch.randn(8, 16), [2, 4, 8], "cpu", warmup=0, repeat=1,
                         loss=(loss_fn, target(8)))
    return prof, request.param


#: (schedule, K, V): every schedule, the split ones (ZB-H1, ZB-V) on stages whose first layer
#: is a linear (the batch, or the stash, kept for W) and not.
SCHEDULES = [("gpipe", 2, 1), ("1f1b", 2, 1), ("zb-h1", 2, 1), ("zb-h1", 3, 1), ("zbv", 2, 2),
             ("interleaved", 2, 2)]


@pytest.mark.parametrize(("schedule", "recompute", "m"),
                         list(itertools.product(SCHEDULES, ("never", "always"), (1, 2, 4))))
def test_predicted_peak_is_what_the_stages_hold(measured: tuple[object, str],
                                                schedule: tuple[str, int, int],
                                                recompute: str, m: int) -> None:
    """The simulator's replayed activation peak and the closed form, from a profile of this
    very model and its loss, equal the bytes each stage held, to the byte: under a split
    backward also what the deferred weight gradients keep from I to W."""
    (prof, loss_name), model, batch = measured, _model(), 8
    (name, big_k, v), loss_fn, target = schedule, *LOSSES[loss_name]
    x, y = torch.randn(batch, 16), target(batch)
    cm = CostModel(prof, batch, m, stages=big_k, recompute=recompute,  # type: ignore[arg-type]
                   schedule=name, stages_per_rank=v)  # type: ignore[arg-type]
    assert cm.activations().exact and cm.step_bytes() == (x.numel() * 4, y.numel() *
                                                          y.element_size())
    assert cm.activations().w is not None  # the profiler measured what W keeps
    ranges = make_plan(cm, devices=["cpu"] * big_k).layer_ranges()
    stages = [Stage(k, build_layers(model, *ranges[k]), "cpu", recompute=cm.recomputes(k))
              for k in range(big_k)]
    results, timeline = LocalRunner(stages, name, m, stages_per_rank=v).run_data(
        StepData.split(x, y, m, loss_fn), True)
    held = [r.peak_activation_bytes for r in results]
    assert held == timeline.meta["stage_activation_peak_bytes"]
    predicted = simulate(cm, ranges, record=False).stage_activation_peak_bytes
    assert list(predicted) == held
    state = cm.param_state_bytes()
    closed = [cm.stage_memory_bytes(*ranges[k], k) - state[slice(*ranges[k])].sum()
              for k in range(big_k)]
    assert closed == pytest.approx(held, rel=1e-12)


def test_split_backward_holds_the_deferred_work_until_w() -> None:
    """Under ZB-H1 a micro-batch holds, from I to W, its deferred linears' inputs and output
    gradients instead of its graph: on this first stage (Linear, ReLU, Linear, GELU; 8 x 32
    floats = 1 KiB per activation) the graph held ReLU's output and GELU's input, W's work
    holds ReLU's output (the second linear's input; the first's is the batch) and both
    linears' output gradients."""
    model, batch = _plain(), 8
    x, y = torch.randn(batch, 16), torch.randn(batch, 4)
    stages = [Stage(k, build_layers(model, *r), "cpu") for k, r in enumerate([(0, 4), (4, 7)])]
    plain = LocalRunner(stages, "1f1b", 1).run_data(
        StepData.split(x, y, 1, lambda out, t: (out - t).mean()), True)[0]
    split = LocalRunner(stages, "zb-h1", 1).run_data(
        StepData.split(x, y, 1, lambda out, t: (out - t).mean()), True)[0]
    batch_bytes, act = x.numel() * 4, 8 * 32 * 4
    assert plain[0].peak_activation_bytes == batch_bytes + 2 * act
    assert split[0].peak_activation_bytes == batch_bytes + 3 * act


def test_profile_loss_needs_a_target_row_per_sample() -> None:
    with pytest.raises(ValueError, match="target of 3 rows, but the largest micro-batch size "
                                         "is 4"):
        profile_model(_plain(), torch.randn(4, 16), [2, 4], "cpu", warmup=0, repeat=1,
                      loss=(nn.functional.mse_loss, torch.randn(3, 4)))


@pytest.mark.parametrize("timing", ["model", "layer"])
def test_profiler_counts_what_w_keeps(timing: str) -> None:
    """Per layer, a deferred linear's input and output gradient (the first layer's input is
    the batch: its part is said, so the first stage counts it once, all step); alone, the
    first layer's split backward is timed too (its input needs no gradient, yet I and W run)."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    prof = profile_model(model, torch.randn(8, 16), [2, 8], "cpu", warmup=0, repeat=1,
                         timing=timing)
    first, relu, last = prof.layers
    assert first.held_for_w_bytes == (2 * (16 + 32) * 4, 8 * (16 + 32) * 4)
    assert first.held_for_w_input_bytes == (2 * 16 * 4, 8 * 16 * 4)
    assert relu.held_for_w_bytes == relu.held_for_w_input_bytes == (0.0, 0.0)
    assert last.held_for_w_bytes == (2 * (32 + 4) * 4, 8 * (32 + 4) * 4)
    if timing == "layer":
        assert first.bwd_weight_ms is not None and min(first.bwd_weight_ms) > 0


def test_meta_storages_are_told_apart_by_their_storage_objects() -> None:
    """On meta every address is 0; the meter counts storages as on a real device."""
    layer = nn.Linear(4, 4, device="meta")
    meter = ActivationMeter(layer)
    meter.begin_step()
    x = torch.empty(8, 4, device="meta")  # 128 bytes
    assert x.data_ptr() == 0 and torch.empty(2, device="meta").data_ptr() == 0
    with meter.saving() as saved:
        y = torch.relu(layer(x))  # the linear saves x (the weight not), relu its output y
    assert sorted(saved.values()) == [128, 128]
    assert meter.storages((x[:4], x.t(), y)) == {**meter.storages(x), **meter.storages(y)}
    assert meter.hold(0, saved, meter.storages(x[2:])) == 256  # x once, whatever the view
