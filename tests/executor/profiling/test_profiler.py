"""The profiler: known costs (sleep layers), exact memory figures, a valid profile, and a user
model left exactly as it was."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import executor.profiling.measure
import executor.profiling.profiler
from executor.profiling.measure import harness_overhead_ms
from executor.profiling.profiler import profile_model, time_whole_model
from executor.workloads.models import build_model, gpt
from partitioner.formats.profile import (
    load_profile,
    profile_from_dict,
    profile_to_dict,
    save_profile,
)
from tests.toy_models import SleepLayer

CPU = torch.device("cpu")
FAST: dict[str, Any] = {"warmup": 1, "repeat": 3, "threads": 1}


def _close(measured: float, expected: float) -> bool:
    """Sleeps overshoot a little (more on a loaded machine), never undershoot."""
    return expected - 0.3 <= measured <= expected * 1.5 + 3


def test_sleep_layers_measure_their_sleeps() -> None:
    model = nn.Sequential(SleepLayer(6, 15), SleepLayer(12, 3))
    prof = profile_model(model, torch.ones(2, 4), [1, 2], "cpu", **FAST)
    for lay, (fwd, bwd) in zip(prof.layers, [(6, 15), (12, 3)], strict=True):
        for j in range(2):
            assert _close(lay.fwd_ms[j], fwd), (lay.name, lay.fwd_ms)
            assert _close(lay.bwd_ms[j], bwd), (lay.name, lay.bwd_ms)
    whole = time_whole_model(model, torch.ones(2, 4), [2], "cpu", **FAST)
    assert _close(whole[0][0], 18) and _close(whole[0][1], 18)


def test_thread_clock_ignores_time_off_the_cpu() -> None:
    prof = profile_model(nn.Sequential(SleepLayer(8, 8)), torch.ones(1, 4), [1], "cpu",
                         clock="thread", **FAST)
    assert prof.layers[0].fwd_ms[0] < 2 and prof.layers[0].bwd_ms[0] < 2
    assert prof.extra["harness"]["clock"] == "thread" and "thread_time" in prof.how


def test_overhead_is_subtracted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor.profiling.profiler, "harness_overhead_ms", lambda dev, clock: (2.0, 4.0))
    model = nn.Sequential(nn.Identity(), SleepLayer(8, 12))
    prof = profile_model(model, torch.ones(1, 4), [1], "cpu", timing="layer", **FAST)
    assert _close(prof.layers[1].fwd_ms[0], 6) and _close(prof.layers[1].bwd_ms[0], 8)
    # the first layer has no backward (data input, no parameters) and no negative time
    assert prof.layers[0].bwd_ms == (0.0,) and prof.layers[0].fwd_ms == (0.0,)
    assert prof.extra["harness"]["overhead_bwd_ms"] == 4.0 and "bwd 4.0000 ms" in prof.how


def test_uncorrected_and_flushed_profiles_say_so() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    prof = profile_model(model, torch.ones(2, 4), [2], "cpu", correct_overhead=False,
                         flush_bytes=2**20, timing="layer", **FAST)
    assert "overhead not corrected" in prof.how and "flushed with 1048576 bytes" in prof.how
    harness = prof.extra["harness"]
    assert harness["overhead_bwd_ms"] == 0 and harness["flush_bytes"] == 2**20


class PairOut(nn.Module):
    """(x, x * scale): a layer whose output is a tuple, one part passed through untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x * self.scale


class PairIn(nn.Module):
    def forward(self, xy: tuple[Tensor, Tensor]) -> Tensor:
        return xy[0] + xy[1]


@pytest.mark.parametrize("timing", ["model", "layer"])
def test_each_layer_gets_its_own_sleeps_in_either_timing(timing: str) -> None:
    """In-place, identity and tuple-passing layers between sleeping ones: each sleep lands on
    its own layer, forward and backward, and nothing on the layers that do no work."""
    model = nn.Sequential(SleepLayer(4, 10), nn.ReLU(inplace=True), SleepLayer(9, 5),
                          nn.Identity(), PairOut(), PairIn(), SleepLayer(7, 12))
    prof = profile_model(model, torch.ones(2, 4), [2], "cpu", timing=timing, **FAST)
    assert prof.extra["harness"]["timing"] == timing
    expected = [(4, 10), None, (9, 5), None, None, None, (7, 12)]
    for lay, want in zip(prof.layers, expected, strict=True):
        if want is None:
            assert lay.fwd_ms[0] < 2 and lay.bwd_ms[0] < 2, (lay.name, lay.fwd_ms, lay.bwd_ms)
        else:
            assert _close(lay.fwd_ms[0], want[0]), (lay.name, lay.fwd_ms)
            assert _close(lay.bwd_ms[0], want[1]), (lay.name, lay.bwd_ms)


def test_in_model_times_add_up_to_the_whole_model() -> None:
    model = nn.Sequential(SleepLayer(5, 8), nn.Linear(4, 4), SleepLayer(6, 3))
    prof = profile_model(model, torch.ones(2, 4), [1, 2], "cpu", timing="model", **FAST)
    assert "inside forward+backward passes of the whole model" in prof.how
    assert prof.extra["harness"]["overhead_bwd_ms"] == 0 and "overhead" not in prof.how
    (fwd, bwd), = time_whole_model(model, torch.ones(2, 4), [2], "cpu", flush_bytes=0, **FAST)
    assert sum(lay.fwd_ms[1] for lay in prof.layers) == pytest.approx(fwd, abs=3)
    assert sum(lay.bwd_ms[1] for lay in prof.layers) == pytest.approx(bwd, abs=3)


def test_auto_times_layers_alone_when_the_model_does_not_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    auto = profile_model(model, torch.ones(2, 4), [2], "cpu", **FAST)
    assert auto.extra["harness"]["timing"] == "model"
    monkeypatch.setattr(executor.profiling.profiler, "free_bytes", lambda dev: 100)  # < 2 x its needs
    small = profile_model(model, torch.ones(2, 4), [2], "cpu", **FAST)
    assert small.extra["harness"]["timing"] == "layer" and "timed alone" in small.how
    # asked for explicitly, the whole model is tried anyway (only running out says no)
    forced = profile_model(model, torch.ones(2, 4), [2], "cpu", timing="model", **FAST)
    assert forced.extra["harness"]["timing"] == "model"
    with pytest.raises(ValueError, match="timing='inside' is not one of auto, model, layer"):
        profile_model(model, torch.ones(2, 4), [2], timing="inside")


def test_progress_reports_each_layer_then_each_size_in_the_model() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    for timing, tail in (("model", ["the whole model at b=1", "the whole model at b=2"]),
                         ("layer", [])):
        seen: list[str] = []
        profile_model(model, torch.ones(2, 4), [2, 1], "cpu", timing=timing,
                      progress=seen.append, **FAST)
        assert seen == ["0", "1", *tail], timing


def test_harness_overhead_is_small_and_finite() -> None:
    fwd, bwd = harness_overhead_ms(CPU, repeat=21, rounds=1)
    assert math.isfinite(fwd) and math.isfinite(bwd)
    assert 0 <= fwd < 1 and 0 <= bwd < 1


def test_memory_figures_are_exact() -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    prof = profile_model(model, torch.randn(8, 16), [1, 3, 8], "cpu", **FAST)
    lin0, relu, lin1 = prof.layers
    for j, b in enumerate(prof.microbatch_sizes):
        assert lin0.in_bytes[j] == b * 16 * 4 and lin0.out_bytes[j] == b * 8 * 4
        assert lin0.saved_bytes[j] == b * 16 * 4  # its input (the weight is a parameter)
        assert relu.saved_bytes[j] == b * 8 * 4  # its output
        assert lin1.saved_bytes[j] == b * 8 * 4 and lin1.out_bytes[j] == b * 4 * 4
    assert (lin0.param_bytes, relu.param_bytes, lin1.param_bytes) == (544, 0, 144)
    assert lin0.type == "Linear" and relu.bwd_ms[0] > 0 and lin0.peak_bytes is None


def test_dtype_casts_parameters_and_floating_inputs_only() -> None:
    w = build_model("gpt-tiny", batch=2)
    f32 = profile_model(w.model, w.sample, [2], "cpu", **FAST)
    bf16 = profile_model(w.model, w.sample, [2], "cpu", dtype="bfloat16", **FAST)
    assert (f32.dtype, bf16.dtype) == ("float32", "bfloat16")
    seq = w.sample.shape[1]
    assert f32.layers[0].in_bytes == bf16.layers[0].in_bytes == (2 * seq * 8,)  # int64 ids
    assert bf16.layers[0].param_bytes * 2 == f32.layers[0].param_bytes
    assert bf16.layers[1].in_bytes[0] * 2 == f32.layers[1].in_bytes[0]
    assert bf16.input is not None and bf16.input["sample_dtype"] == "int64"


class Recorder(nn.Module):
    seen: ClassVar[list[Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        Recorder.seen.append(x.detach().clone())
        return x


class Pair(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, 2 * x[:, :2]


class Join(nn.Module):
    def forward(self, xy: tuple[Tensor, Tensor]) -> Tensor:
        return xy[0][:, :2] + xy[1]


def test_inputs_come_from_a_real_forward_pass_and_tuples_flow() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Recorder(), Pair(), Join())
    sample = torch.randn(3, 4)
    Recorder.seen.clear()
    prof = profile_model(model, sample, [1, 3], "cpu", **FAST)
    expected = {b: model[0](sample[:b]).detach() for b in (1, 3)}
    assert Recorder.seen and all(torch.allclose(x, expected[len(x)]) for x in Recorder.seen)
    pair, join = prof.layers[2], prof.layers[3]
    assert pair.out_bytes == (4 * (4 + 2), 4 * 3 * (4 + 2)) == join.in_bytes
    assert join.out_bytes == (4 * 2, 4 * 3 * 2)


def _state(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: None if v.grad is None else v.grad.clone()
                  for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "devices": {v.device for v in model.parameters()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def test_model_rng_threads_and_sample_are_left_as_they_were() -> None:
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    model[1].weight.grad = torch.full_like(model[1].weight, 0.5)  # an existing gradient
    model[3].eval()  # mixed training flags
    model[5].bias.requires_grad_(False)
    sample = torch.randn(4, 3, 8, 8)
    sample_before = sample.clone()
    before = _state(model)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    profile_model(model, sample, [2, 4], "cpu", **FAST)
    after = _state(model)
    for key in ("params", "buffers"):
        assert all(torch.equal(before[key][k], after[key][k]) for k in before[key]), key
    assert after["grads"]["5.weight"] is None and after["grads"]["1.bias"] is None
    assert torch.equal(after["grads"]["1.weight"], before["grads"]["1.weight"])
    for key in ("training", "devices", "requires_grad"):
        assert before[key] == after[key], key
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert torch.equal(sample, sample_before)  # the in-place ReLU ran on copies
    assert torch.is_grad_enabled()


def test_profile_is_valid_and_round_trips(tmp_path: Any) -> None:
    w = build_model("resnet-tiny", batch=4)
    prof = profile_model(w.model, w.sample, [4, 2], "cpu", name="resnet-tiny",
                         input_info=w.input_info, **FAST)
    assert prof.microbatch_sizes == (2, 4) and prof.num_layers == len(w.model)
    assert profile_from_dict(profile_to_dict(prof)) == prof
    save_profile(prof, tmp_path / "p.json")
    loaded = load_profile(tmp_path / "p.json")
    assert loaded == prof
    assert loaded.device.kind == "cpu" and loaded.device.memory_bytes > 2**28
    assert loaded.input is not None and loaded.input["kind"] == "images"
    assert loaded.input["sample_shape"] == [3, 64, 64]
    assert loaded.torch == torch.__version__ and loaded.created.endswith("Z")
    assert "median of 3 after 1 warm-up" in loaded.how and "intra-op thread" in loaded.how
    # a convolutional layer's costs grow with the micro-batch
    stem = loaded.layers[0]
    assert stem.out_bytes[1] == 2 * stem.out_bytes[0] and stem.param_bytes == 8 * 3 * 49 * 4


def test_bad_arguments_are_refused_with_the_fix() -> None:
    seq = nn.Sequential(nn.Linear(4, 4))
    # any other module is traced into a graph (executor.profiling.graph), not refused
    assert profile_model(nn.Linear(4, 4), torch.ones(2, 4), [1], warmup=0,
                         repeat=1).extra["trace"]["tracer"] == "fx"
    with pytest.raises(ValueError, match=r"\[4, 8\] are larger than the sample batch of 2"):
        profile_model(seq, torch.ones(2, 4), [1, 4, 8])
    with pytest.raises(ValueError, match="whole numbers >= 1"):
        profile_model(seq, torch.ones(2, 4), [0, 1])
    with pytest.raises(ValueError, match="needs threads=1"):
        profile_model(seq, torch.ones(2, 4), [1], threads=2, clock="thread")
    with pytest.raises(ValueError, match="warmup=-1 must be >= 0"):
        profile_model(seq, torch.ones(2, 4), [1], warmup=-1)
    with pytest.raises(TypeError, match="tensor or a non-empty tuple"):
        profile_model(seq, [torch.ones(2, 4)], [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layer 1 \(Linear\) failed at micro-batch size 1"):
        profile_model(nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 2)), torch.ones(2, 4), [1])
    with pytest.raises(ValueError, match="output of layer 0 is a list"):
        profile_model(nn.Sequential(Listify()), torch.ones(2, 4), [1])


class Listify(nn.Module):
    def forward(self, x: Tensor) -> list[Tensor]:
        return [x]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_missing_cuda_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="needs CUDA, which this machine lacks"):
        profile_model(nn.Sequential(nn.Linear(4, 4)), torch.ones(2, 4), [1], "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_profile_has_peak_bytes_and_leaves_the_model_on_cpu() -> None:
    w = build_model("gpt-tiny", batch=2)
    prof = profile_model(w.model, w.sample, [1, 2], "cuda", **FAST)
    assert prof.device.kind == "cuda" and all(lay.peak_bytes for lay in prof.layers)
    assert {p.device.type for p in w.model.parameters()} == {"cpu"}


def test_measure_accumulates_gradients_as_training_does_and_puts_the_module_back() -> None:
    seen: list[int] = []
    layer = nn.Linear(3, 3)
    # every timed backward lands in .grad, and always in the same buffer: it accumulates, as
    # every micro-batch after a step's first does in the runner
    layer.weight.register_post_accumulate_grad_hook(
        lambda p: seen.append(p.grad.data_ptr()))  # type: ignore[union-attr]
    kept = torch.full_like(layer.bias, 0.5)
    layer.bias.grad = kept
    executor.profiling.measure.measure(layer, torch.ones(2, 3), torch.device("cpu"), warmup=0, repeat=2)
    assert len(seen) == 2 and len(set(seen)) == 1
    assert layer.weight.grad is None and layer.bias.grad is kept


def test_measure_split_times_i_and_w_and_accumulates_w_as_a_backward_does() -> None:
    seen: list[int] = []
    layer = nn.Linear(3, 3)
    layer.weight.register_post_accumulate_grad_hook(
        lambda p: seen.append(p.grad.data_ptr()))  # type: ignore[union-attr]
    m = executor.profiling.measure.measure(layer, torch.ones(2, 3), CPU, warmup=0, repeat=2,
                                           split=True)
    assert m.bwd_input_ms is not None and m.bwd_weight_ms is not None
    assert m.bwd_input_ms >= 0 and m.bwd_weight_ms > 0
    assert len(seen) == 4 and len(set(seen)) == 1  # 2 fused backwards, then 2 W
    assert layer.weight.grad is None
    relu = executor.profiling.measure.measure(nn.ReLU(), torch.ones(2, 3), CPU, warmup=0,
                                              repeat=1, split=True)
    assert relu.bwd_weight_ms == 0.0 and relu.bwd_input_ms is not None
    plain = executor.profiling.measure.measure(nn.ReLU(), torch.ones(2, 3), CPU, repeat=1)
    assert plain.bwd_input_ms is None and plain.bwd_weight_ms is None


def _gpt_with_a_parameter_free_layer() -> tuple[nn.Sequential, Tensor]:
    """A small GPT chain (Embed, 2 Blocks, Head) with a Dropout layer after the first Block."""
    model = gpt(vocab=64, seq=16, d_model=32, heads=2, layers=2)
    model.insert(2, nn.Dropout(0.1))
    return model, torch.randint(64, (2, 16))


#: I + W against the fused backward, summed over the model: a sanity bound, not a prediction.
#: The split does the same arithmetic as B, plus the Python of each deferred linear's I and one
#: gradient-accumulation call per W; on a CPU at these tiny sizes that overhead and timing
#: noise (a shared machine) move the sum, so only a factor far off means a layer lost or
#: double-counted its backward.
SPLIT_BOUND = (0.5, 2.5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("timing", ["model", "layer"])
def test_profile_splits_the_backward_into_i_and_w(timing: str) -> None:
    model, ids = _gpt_with_a_parameter_free_layer()
    prof = profile_model(model, ids, [1, 2], "cpu", timing=timing, clock="thread", **FAST)
    linear = ["Block", "Head"]  # layers with nn.Linear weights; Embed has embeddings only
    for lay in prof.layers:
        assert lay.bwd_input_ms is not None and lay.bwd_weight_ms is not None, lay.name
        assert len(lay.bwd_input_ms) == len(lay.bwd_weight_ms) == 2
        assert all(math.isfinite(t) and t >= 0 for t in lay.bwd_input_ms + lay.bwd_weight_ms)
        if lay.type in linear:
            assert all(w > 0 for w in lay.bwd_weight_ms), (lay.name, lay.bwd_weight_ms)
        else:
            assert lay.bwd_weight_ms == (0.0, 0.0), (lay.name, lay.type)
    assert [lay.type for lay in prof.layers] == ["Embed", "Block", "Dropout", "Block", "Head"]
    split = sum(i + w for lay in prof.layers
                for i, w in zip(lay.bwd_input_ms or (), lay.bwd_weight_ms or (), strict=True))
    fused = sum(sum(lay.bwd_ms) for lay in prof.layers)
    assert SPLIT_BOUND[0] * fused <= split <= SPLIT_BOUND[1] * fused, (split, fused)
    assert "split backward" in prof.how and "deferring" in prof.extra["harness"]["split_backward"]
    assert profile_from_dict(profile_to_dict(prof)) == prof


def test_profile_without_the_split_has_no_split_fields() -> None:
    model, ids = _gpt_with_a_parameter_free_layer()
    prof = profile_model(model, ids, [1], "cpu", split_backward=False, warmup=0, repeat=1)
    assert all(lay.bwd_input_ms is None and lay.bwd_weight_ms is None for lay in prof.layers)
    assert prof.extra["harness"]["split_backward"] is None and "split" not in prof.how
