"""count_layers on the meta device: the real profiler's bytes exactly, FLOPs in closed form and
as FlopCounterMode counts real tensors, no memory for a model of gigabytes, clear errors."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from executor.profiling.meta import count_layers
from executor.profiling.metaops import CPU_FLASH_FLOPS, Work
from executor.profiling.profiler import profile_model
from executor.workloads.models import build_model, gpt, lm_loss

BYTES = ("in_bytes", "out_bytes", "saved_bytes", "saved_input_bytes", "saved_output_bytes",
         "held_for_w_bytes", "held_for_w_input_bytes")


@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-text", "resnet-tiny"])
def test_bytes_equal_the_real_profilers(name: str) -> None:
    w = build_model(name, batch=2)
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    real = profile_model(w.model, w.sample, [1, 2], "cpu", warmup=0, repeat=1, threads=1,
                         loss=(w.loss_fn, w.target))
    meta = count_layers(w.model, w.sample, [1, 2], loss=(w.loss_fn, w.target))
    assert meta.microbatch_sizes == real.microbatch_sizes and meta.dtype == real.dtype
    assert [(c.name, c.type, c.param_bytes) for c in meta.layers] == \
        [(p.name, p.type, p.param_bytes) for p in real.layers]
    for counted, measured in zip(meta.layers, real.layers, strict=True):
        for key in BYTES:  # exactly: the same code counts both
            assert getattr(counted, key) == getattr(measured, key), (measured.name, key)
        assert counted.peak_bytes is None  # CUDA's allocator only (the real one: CPU, None)
    assert meta.loss == real.loss
    # the user's model is untouched: on the CPU, same values, no gradients
    assert all(torch.equal(v, before[k]) for k, v in w.model.state_dict().items())
    assert all(p.device.type == "cpu" and p.grad is None for p in w.model.parameters())


def test_bfloat16_bytes_differ_only_by_layernorms_float32_statistics() -> None:
    """The meta kernels keep a bf16 LayerNorm's mean and rstd in float32, as CUDA does; the
    CPU keeps them in bf16: 2 x 2 bytes less per row and LayerNorm (on gpt-tiny 0.4% of a
    block's saved bytes, 1.5% of the head's). All else is exact."""
    w = build_model("gpt-tiny", batch=2)
    real = profile_model(w.model, w.sample, [1, 2], "cpu", dtype=torch.bfloat16, warmup=0,
                         repeat=1, threads=1, loss=(w.loss_fn, w.target))
    meta = count_layers(w.model, w.sample, [1, 2], torch.bfloat16, loss=(w.loss_fn, w.target))
    assert meta.dtype == real.dtype == "bfloat16" and meta.loss == real.loss
    for counted, measured, layer in zip(meta.layers, real.layers, w.model, strict=True):
        norms = sum(isinstance(m, nn.LayerNorm) for m in layer.modules())
        assert counted.param_bytes == measured.param_bytes
        for key in BYTES:
            extra = [2 * 2 * norms * b * 32 if key == "saved_bytes" else 0 for b in (1, 2)]
            assert [c - m for c, m in zip(getattr(counted, key), getattr(measured, key),
                                          strict=True)] == extra, (measured.name, key)


def test_a_model_built_on_meta_counts_as_the_real_one() -> None:
    real = count_layers(build_model("gpt-tiny", batch=2).model, build_model("gpt-tiny", 2).sample,
                        [2])
    w = build_model("gpt-tiny", batch=2, device="meta")
    assert w.sample.is_meta and all(p.is_meta for p in w.model.parameters())
    assert count_layers(w.model, w.sample, [2]) == real


def test_linear_flops_kernels_and_bytes_follow_the_stated_rules() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.Flatten(), nn.Linear(32, 8))
    counts = count_layers(model, torch.ones(4, 16), [1, 4])
    first, view, last = counts.layers
    for j, b in enumerate((1, 4)):
        assert first.fwd[j].flops == 2 * b * 16 * 32 and last.fwd[j].flops == 2 * b * 32 * 8
        # addmm reads the bias, x and W, writes y: one kernel
        assert last.fwd[j] == Work(2 * b * 32 * 8, 4 * (8 + b * 32 + 32 * 8 + b * 8), 1)
        assert view.fwd[j] == Work(0, 0, 0) == view.bwd[j]  # a view: no kernel, no bytes
        # layer 0's input is data: its backward is the weight gradient only; later layers'
        # also the input gradient. Split: I the input gradient, W the weight gradient
        assert first.bwd[j].flops == 2 * b * 16 * 32 and last.bwd[j].flops == 4 * b * 32 * 8
        assert (first.bwd_input[j].flops, first.bwd_weight[j].flops) == (0, 2 * b * 16 * 32)
        assert last.bwd_input[j].flops == last.bwd_weight[j].flops == 2 * b * 32 * 8
    with FlopCounterMode(display=False) as real:  # the same counter on real CPU tensors
        model[2](torch.ones(4, 32, requires_grad=True)).sum().backward()
    assert real.get_total_flops() == last.fwd[1].flops + last.bwd[1].flops


def test_gpt_block_flops_in_closed_form_and_as_counted_on_real_tensors() -> None:
    b, t, d = 2, 32, 64  # gpt-tiny: 4 heads, vocab 256
    w = build_model("gpt-tiny", batch=b)
    counts = count_layers(w.model, w.sample, [b])
    linears = 2 * b * t * (d * 3 * d + d * d + d * 4 * d + 4 * d * d)  # qkv, proj, MLP up, down
    attention = 2 * (2 * b * t * t * d)  # q k^T and p v, over all heads (causality ignored)
    block = counts.layers[1]
    assert block.fwd[0].flops == linears + attention
    assert counts.layers[-1].fwd[0].flops == 2 * b * t * d * 256  # the LM head
    assert block.bwd[0].flops == block.bwd_input[0].flops + block.bwd_weight[0].flops
    x = torch.randn(b, t, d, requires_grad=True)
    with FlopCounterMode(display=False) as plain:  # no formula for the CPU's flash kernel
        w.model[1](x)
    with FlopCounterMode(display=False, custom_mapping=CPU_FLASH_FLOPS) as full:
        w.model[1](x).sum().backward()
    assert plain.get_total_flops() == linears
    assert full.get_total_flops() == block.fwd[0].flops + block.bwd[0].flops


def test_attention_math_saves_the_attention_weights() -> None:
    w = build_model("gpt-tiny", batch=1, device="meta")
    flash = count_layers(w.model[:2], w.sample, [1]).layers[1]
    math = count_layers(w.model[:2], w.sample, [1], attention="math").layers[1]
    assert math.fwd[0].flops == flash.fwd[0].flops and math.fwd[0].kernels > flash.fwd[0].kernels
    # the math path keeps the softmax (4 heads x 32 x 32 floats), the flash kernel does not
    assert math.saved_bytes[0] - flash.saved_bytes[0] >= 4 * 32 * 32 * 4


def _peak_rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def test_a_model_of_two_gigabytes_counts_in_no_memory() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident size
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak resident size")
    start = time.perf_counter()
    with torch.device("meta"):
        model = gpt(vocab=50304, seq=1024, d_model=2048, heads=16, layers=6)
        tokens = torch.zeros(1, 1024, dtype=torch.long)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) > 2e9
    counts = count_layers(model, tokens, [1], loss=(lm_loss, tokens))
    assert time.perf_counter() - start < 30
    assert _peak_rss_kib() * 1024 < _rss_now() + 300 * 2**20  # far below 2 GB above now
    assert counts.layers[1].saved_bytes[0] > 1e8 and counts.loss is not None


def _rss_now() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


class _Item(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * int(x.sum().item())


class _MaskIndex(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[x > 0].sum().expand_as(x)


class _Unique(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.unique(x, dim=0)


class _CpuConstant(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x + torch.ones(3, device="cpu")


class _WrongShape(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x @ torch.ones(4, 4)  # x is (b, 3)


@pytest.mark.parametrize(("layer", "op", "fix"), [
    (_Item(), "aten._local_scalar_dense", "shape-static"),
    (_MaskIndex(), "aten.index.Tensor", "shape-static"),
    (_Unique(), "aten.unique_dim", "register_fake"),
    (_CpuConstant(), "aten.add.Tensor", "register it as a buffer"),
    (_WrongShape(), "aten.mm", "fail on a real device too")])
def test_a_layer_that_cannot_run_on_meta_is_named_with_its_op_and_fix(
        layer: nn.Module, op: str, fix: str) -> None:
    model = nn.Sequential(nn.Linear(3, 3), layer)
    with pytest.raises(ValueError, match=rf"layer 1 \('1', {type(layer).__name__}\)") as err:
        count_layers(model, torch.ones(2, 3), [1, 2])
    assert op in str(err.value) and fix in str(err.value)


def test_bad_arguments_are_all_reported_at_once() -> None:
    with pytest.raises(TypeError, match=r"nn\.Sequential"):
        count_layers(nn.Linear(2, 2), torch.ones(1, 2), [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sizes \[0, 3\].*larger than the sample.*attention"):
        count_layers(nn.Sequential(nn.Linear(2, 2)), torch.ones(2, 2), [0, 3],
                     attention="flash")
