"""The example graph models: they build, run, and their loss takes the model's own output."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from executor.workloads.graphmodels import GRAPH_MODELS, build_graph_model, transformers_module
from executor.workloads.models import list_models


@pytest.mark.parametrize("name", list(GRAPH_MODELS))
def test_each_example_runs_and_its_loss_is_finite(name: str) -> None:
    if name != "tiny-unet":
        pytest.importorskip("transformers")
    w = build_graph_model(name, batch=3)
    sample = w.sample
    out = w.model(**sample) if isinstance(sample, dict) else w.model(sample)
    loss = w.loss_fn(out, w.target)
    assert loss.dim() == 0 and math.isfinite(loss.item()) and w.target.shape[0] == 3
    loss.backward()
    assert all(p.grad is not None for p in w.model.parameters() if p.requires_grad)


def test_registry_determinism_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"tiny-gpt2", "tiny-unet"} <= {n for n, _ in list_models()}
    a, b = build_graph_model("tiny-unet", 2), build_graph_model("tiny-unet", 2)
    assert torch.equal(a.sample, b.sample)
    with pytest.raises(ValueError, match="unknown graph model 'x'"):
        build_graph_model("x")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install gpipe-planner\[models\]"):
        transformers_module()
