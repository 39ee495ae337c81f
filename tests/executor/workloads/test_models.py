"""Built-in models: shapes, dtypes, parameter counts against closed forms, determinism, and
that the default model trains."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from executor.workloads.models import (
    DEFAULT_MODEL,
    MODELS,
    build_model,
    gpt,
    list_models,
)

SMALL = ["gpt-tiny", "gpt-small", "resnet-tiny", "resnet-small"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: fast and steady on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", SMALL)
def test_small_models_run_layer_by_layer(name: str) -> None:
    w = build_model(name, batch=2)
    assert isinstance(w.model, nn.Sequential) and w.sample.shape[0] == w.target.shape[0] == 2
    x = w.sample
    with torch.no_grad():
        for layer in w.model:
            x = layer(x)
            assert isinstance(x, torch.Tensor) and x.shape[0] == 2  # one tensor between layers
        loss = w.loss_fn(x, w.target)
    assert loss.dim() == 0 and math.isfinite(loss.item())


def num_params(model: nn.Module) -> int:
    """Parameters of a model, each shared one counted once."""
    return sum(p.numel() for p in model.parameters())


def test_gpt_shapes_dtypes_and_loss_at_initialisation() -> None:
    w = build_model("gpt-tiny", batch=3)
    info = w.input_info
    assert w.sample.dtype == w.target.dtype == torch.int64
    assert w.sample.shape == (3, info["seq"]) and int(w.sample.max()) < info["vocab"]
    assert torch.equal(w.sample[:, 1:], w.target[:, :-1])  # the target is the next token
    logits = w.model(w.sample)
    assert logits.shape == (3, info["seq"], info["vocab"]) and logits.dtype == torch.float32
    # an untrained model is close to uniform: cross-entropy near log(vocab)
    assert abs(w.loss_fn(logits, w.target).item() - math.log(info["vocab"])) < 1.0
    assert [type(m).__name__ for m in w.model] == ["Embed"] + ["Block"] * 4 + ["Head"]


def test_gpt_is_causal() -> None:
    w = build_model("gpt-tiny", batch=1)
    changed = w.sample.clone()
    changed[0, -1] = (changed[0, -1] + 1) % w.input_info["vocab"]
    with torch.no_grad():
        a, b = w.model(w.sample), w.model(changed)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5)  # earlier tokens do not see it
    assert not torch.allclose(a[:, -1], b[:, -1])


def _gpt_params(vocab: int, seq: int, d: int, blocks: int) -> int:
    """Embeddings, per block (LN, qkv, proj, LN, 4x MLP) 12 d^2 + 13 d, final LN, head."""
    return vocab * d + seq * d + blocks * (12 * d * d + 13 * d) + 2 * d + vocab * d


@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-small", "gpt2-medium", "gpt-1.3b"])
def test_gpt_parameter_counts_match_the_closed_form(name: str) -> None:
    builder, _ = MODELS[name]
    with torch.device("meta"):  # shapes only: no memory, no time
        w = builder(name, 1)
    i = w.input_info
    assert num_params(w.model) == _gpt_params(i["vocab"], i["seq"], i["d_model"], i["blocks"])
    assert len(w.model) == i["blocks"] + 2


def test_resnet50_has_the_resnet50_shape() -> None:
    with torch.device("meta"):
        w = MODELS["resnet50"][0]("resnet50", 2)
    assert len(w.model) == 23  # conv, bn, relu, maxpool, 16 bottlenecks, avgpool, flatten, fc
    assert sum(type(m).__name__ == "Bottleneck" for m in w.model) == 3 + 4 + 6 + 3
    assert num_params(w.model) == 25_557_032  # the published ResNet-50 count
    assert w.sample.shape == (2, 3, 224, 224) and w.target.dtype == torch.int64


def test_resnet_tiny_output_and_downsampling() -> None:
    w = build_model("resnet-tiny", batch=2)
    shapes = []
    x = w.sample
    with torch.no_grad():
        for layer in w.model:
            x = layer(x)
            shapes.append(tuple(x.shape[1:]))
    assert shapes[3] == (8, 16, 16) and shapes[-1] == (w.input_info["classes"],)
    assert shapes[-4] == (32 * 8, 2, 2)  # last bottleneck: 4 x 8 x 2^3 channels, 64 / 32


def test_build_is_deterministic_and_leaves_the_global_rng() -> None:
    rng = torch.get_rng_state()
    a, b = build_model("gpt-tiny", batch=2), build_model("gpt-tiny", batch=2)
    c = build_model("gpt-tiny", batch=2, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a.sample, b.sample) and not torch.equal(a.sample, c.sample)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_default_model_trains_in_a_few_steps() -> None:
    w = build_model(DEFAULT_MODEL, batch=4)
    opt = torch.optim.Adam(w.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):  # memorise one batch
        opt.zero_grad()
        loss = w.loss_fn(w.model(w.sample), w.target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_registry_and_errors() -> None:
    names = [n for n, _ in list_models()]
    assert DEFAULT_MODEL in names and {"gpt2-medium", "resnet50"} <= set(names)
    with pytest.raises(ValueError, match=r"unknown model 'gpt-huge'.*gpt-tiny"):
        build_model("gpt-huge")
    with pytest.raises(ValueError, match="batch=0"):
        build_model("gpt-tiny", batch=0)
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        gpt(vocab=8, seq=4, d_model=16, heads=3, layers=1)
