"""Layers timed inside the whole model: each layer's own forward and backward, also where
layers pass tuples on whose tensors go through several layers unchanged (a U-Net's skips)."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import Tensor, nn

from executor.profiling.inmodel import time_layers_in_model, time_split_in_model
from executor.profiling.profiler import profile_model
from partitioner.formats.profile import Profile
from tests import toy_models
from tests.timing import settle
from tests.toy_models import SleepLayer

CPU = torch.device("cpu")


class Encoder(SleepLayer):
    """x -> (x, s1, s2, ids, mask): two skips that need gradients, an integer tensor and a
    float tensor that needs none."""

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        h = self.sleep(x)
        ids = torch.arange(x.shape[0])
        return h, h * 0.5, h * 0.25, ids, torch.ones(x.shape[0], 1)


class Pass(SleepLayer):
    """Transforms x; passes the skips, ids and mask on unchanged (the same tensor objects)."""

    def forward(self, t: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x, *rest = t
        return (self.sleep(x * t[-1]), *rest)


class InPlaceReLU(nn.Module):
    """ReLU in place on every tensor that needs a gradient (x and the skips)."""

    def forward(self, t: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x, s1, s2, ids, mask = t
        return x.relu_(), s1.relu_(), s2.relu_(), ids, mask


class Merge(SleepLayer):
    """Adds the last skip into x and drops it."""

    def forward(self, t: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x, *skips, ids, mask = t
        return (self.sleep(x + skips[-1]), *skips[:-1], ids, mask)


class Probe(nn.Module):
    """Passes its input on, keeping a copy of its values and, in the backward, of the
    gradients that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []
        self.grads: list[Tensor] = []

    def forward(self, t: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.seen = [x.detach().clone() for x in t]
        self.grads = []
        for x in t:
            if x.requires_grad:
                x.register_hook(lambda g: self.grads.append(g.clone()))
        return t


#: (fwd_ms, bwd_ms) of the sleeping layers of ``unet``
UNET_MS: list[tuple[float, float]] = [(5, 10), (8, 12), (6, 16), (10, 6), (5, 8), (12, 5)]


def unet(inplace: bool) -> tuple[nn.Sequential, list[tuple[float, float]]]:
    """Encoder, three Pass, a Merge of s2, a Merge of s1 (an InPlaceReLU after the first Pass
    if ``inplace``); and the expected (fwd_ms, bwd_ms) of each layer."""
    ms = list(UNET_MS)
    layers: list[nn.Module] = [Encoder(*ms[0]), *(Pass(*m) for m in ms[1:4]),
                               Merge(*ms[4]), Merge(*ms[5])]
    if inplace:
        layers.insert(2, InPlaceReLU())
        ms.insert(2, (0.0, 0.0))
    return nn.Sequential(*layers), ms


def _near(measured: float, expected: float) -> bool:
    """Within half the sleep and a millisecond (sleeps overshoot on a loaded machine)."""
    return abs(measured - expected) <= 0.5 * expected + 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("inplace", [False, True])
def test_tensors_passed_through_several_layers_leave_each_its_own_backward(
        inplace: bool) -> None:
    """Before the fix every skip's hooks fired only when its last consumer, the encoder, was
    done: the three Pass layers and the s2 Merge got a backward of 0 and the last layer all
    of theirs."""
    model, expected = unet(inplace)

    def misses(times: list[tuple[float, float, bool]]) -> list[str]:
        assert all(has for _, _, has in times)
        got = [(round(f, 2), round(b, 2)) for f, b, _ in times]
        return [f"layer {i}: {got[i]}, expected {want}" for i, ((fwd, bwd, _), want)
                in enumerate(zip(times, expected, strict=True))
                if not (_near(fwd, want[0]) and _near(bwd, want[1]))]

    assert not settle(lambda: time_layers_in_model(model, torch.ones(2, 4), CPU, warmup=1,
                                                   repeat=5), misses)


@pytest.mark.timeout(120)
def test_profile_model_times_the_unet_layers_in_the_model() -> None:
    model, expected = unet(inplace=True)

    def misses(prof: Profile) -> list[str]:
        assert prof.extra["harness"]["timing"] == "model"
        return [f"layer {lay.name}: fwd {lay.fwd_ms} bwd {lay.bwd_ms}, expected {want}"
                for lay, want in zip(prof.layers, expected, strict=True)
                if not all(_near(lay.fwd_ms[j], want[0]) and _near(lay.bwd_ms[j], want[1])
                           for j in range(2))]

    assert not settle(lambda: profile_model(model, torch.ones(2, 4), [1, 2], "cpu",
                                            timing="model", warmup=1, repeat=3, threads=1),
                      misses)


def test_values_and_gradients_are_as_without_timing() -> None:
    """The aliases change nothing the layers see, forward or backward, in-place layers and
    integer tensors included; and the model's own gradients come back untouched."""
    model = nn.Sequential(Encoder(0, 0), Pass(0, 0), Probe(), InPlaceReLU(), Pass(0, 0),
                          Merge(0, 0), Probe(), Merge(0, 0), Probe())
    probes = [m for m in model if isinstance(m, Probe)]
    param_grads: list[Tensor] = []
    for p in model.parameters():
        p.register_hook(lambda g: param_grads.append(g.clone()))
    out = model(torch.ones(2, 4))
    torch.autograd.backward(out[0], torch.ones_like(out[0]))
    plain = [(p.seen, p.grads) for p in probes], list(param_grads)
    param_grads.clear()
    own = [p.grad for p in model.parameters()]
    time_layers_in_model(model, torch.ones(2, 4), CPU, warmup=0, repeat=1)
    assert all(p.grad is g for p, g in zip(model.parameters(), own, strict=True))
    assert [len(p.seen) for p in probes] == [5, 4, 3]
    assert [len(p.grads) for p in probes] == [3, 2, 1]
    assert probes[0].seen[3].dtype == torch.int64 and probes[2].seen[1].tolist() == [0, 1]
    for probe, (seen, grads) in zip(probes, plain[0], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(probe.seen, seen, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(probe.grads, grads, strict=True))
    assert len(param_grads) == 5
    assert all(torch.equal(a, b) for a, b in zip(param_grads, plain[1], strict=True))


@pytest.mark.timeout(120)
def test_identical_blocks_get_similar_backwards_when_a_gate_passes_through() -> None:
    """toy_models.gpt: every Block reads the gate the embedding made and passes it on; the
    blocks do the same work, so none may get all of the backward and the others nothing."""
    model = toy_models.gpt()
    ids, _ = toy_models.gpt_batch(8)
    blocks = []
    for _ in range(3):  # medians of three runs, against a loaded machine
        times = time_layers_in_model(model, ids, CPU, warmup=2, repeat=7)
        blocks.append([b for _, b, _ in times[1:-1]])
    per_block = [statistics.median(run[k] for run in blocks) for k in range(len(blocks[0]))]
    assert len(per_block) == toy_models.GPT_LAYERS - 2
    assert min(per_block) > 0.3 * max(per_block), per_block


def test_layers_that_pass_nothing_needing_grad_have_no_backward() -> None:
    model = nn.Sequential(nn.Identity(), Encoder(0, 0), Pass(0, 0))
    times = time_layers_in_model(model, torch.ones(2, 4), CPU, warmup=0, repeat=1)
    assert [has for _, _, has in times] == [False, True, True]
    assert times[0][1] == 0.0


def test_split_backward_gives_w_to_the_layers_with_linear_weights_only() -> None:
    """I and W in the model: W > 0 exactly where a linear's weight gradient was deferred; the
    model's own gradients come back as they were."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 2))
    own = [p.grad for p in model.parameters()]
    split = time_split_in_model(model, torch.ones(4, 8), CPU, warmup=1, repeat=3)
    assert [w > 0 for _, w in split] == [True, False, False, True]
    assert all(i >= 0 for i, _ in split) and split[1][1] == split[2][1] == 0.0
    assert all(p.grad is g for p, g in zip(model.parameters(), own, strict=True))


def test_split_backward_of_a_layer_without_backward_is_zero() -> None:
    model = nn.Sequential(nn.Identity(), nn.Linear(4, 4))
    split = time_split_in_model(model, torch.ones(2, 4), CPU, warmup=0, repeat=1)
    assert split[0] == (0.0, 0.0) and split[1][1] > 0  # data in: the Linear's W still runs
