"""Stages: layers from the model or from factories, device checks, replayed randomness."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from executor.runtime.devices import check_device, resolve_device
from executor.runtime.stage import Stage, build_layers
from tests import toy_models as em


def test_build_layers_from_model_or_factories() -> None:
    model = em.mlp()
    assert [i for i, _ in build_layers(model, 2, 5)] == [2, 3, 4]
    assert build_layers(model, 3, 4)[0][1] is model[3]  # the model's own layer
    built: list[int] = []

    def per_layer(i: int) -> nn.Module:
        built.append(i)
        return em.mlp_layer(i)

    def per_range(start: int, end: int) -> Sequence[nn.Module]:
        return [em.mlp_layer(i) for i in range(start, end)]

    layers = build_layers(per_layer, 3, 5)
    assert built == [3, 4]  # only this stage's layers are ever built
    assert torch.equal(layers[0][1].weight, model[3].weight)  # type: ignore[union-attr]
    assert [i for i, _ in build_layers(per_range, 0, 2)] == [0, 1]
    with pytest.raises(ValueError, match="returned 1 layers for the range \\[0, 2\\)"):
        build_layers(lambda s, e: [nn.ReLU()], 0, 2)
    with pytest.raises(TypeError, match="layer 1 is a str"):
        build_layers(lambda i: "no", 1, 2)  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match=r"nn\.Sequential or a layer factory"):
        build_layers(3, 0, 1)  # type: ignore[arg-type]


def test_stage_names_parameters_like_the_plain_model() -> None:
    model = em.mlp()
    stage = Stage(1, build_layers(model, 3, 7), "cpu")
    names = {n for n, _ in stage.module.named_parameters()}
    assert names == {n for n, _ in model.named_parameters() if int(n.split(".")[0]) >= 3}
    assert repr(stage) == "Stage(1, layers [3, 7), cpu)"
    with pytest.raises(ValueError, match="stage 2 has no layers"):
        Stage(2, [], "cpu")


def test_devices_are_checked() -> None:
    assert check_device("cpu") is None and resolve_device("cpu") == torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert "cuda:99" in str(check_device("cuda:99"))
    assert ("lacks" in str(check_device("cuda"))) == (count == 0)
    assert "not a torch device name" in str(check_device("tpu-ish"))
    assert "not supported" in str(check_device("meta"))


def test_replaying_restores_the_forward_randomness() -> None:
    stage = Stage(0, [(0, nn.Dropout(0.5))], "cpu", recompute=True)
    x = torch.ones(1000)
    state = stage.rng_state()
    first = stage(x)
    after = torch.get_rng_state()
    with stage.replaying(state):
        again = stage(x)
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), after)  # the global stream goes on unchanged
