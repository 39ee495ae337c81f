"""Tracing into layers: blocks, tracer choice, values and edges, ties, refinement, weights."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn

from executor.graphs.blocks import block_paths
from executor.graphs.capture import TraceError
from executor.graphs.layers import trace_model
from executor.graphs.stage import graph_stages, route
from executor.graphs.weights import materialise, save_weights
from executor.workloads.graphmodels import build_graph_model


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class Net(nn.Module):
    """Embedding, three blocks with a skip from the embedding to the head, the embedding's
    weight used again by the head (called twice: a tie)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = e = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return {"logits": self.head(h + self.embed(e)), "size": x.shape[0]}


def test_repeated_blocks_are_the_layers_and_the_glue_between_them_too() -> None:
    g = trace_model(Net(), torch.ones(3, 4))
    assert g.capture.tracer == "fx"
    assert [la.name for la in g.layers] == ["embed", "blocks.0", "blocks.1", "blocks.2",
                                            "embed+head"]
    assert all(u < v for u, v, _ in g.edges)
    # the embedding's output (and the input, whose size the head reads) skips past every block
    assert (0, 4, ("x", "embed")) in g.edges
    assert g.tied() == {"embed.weight": [0, 4], "embed.bias": [0, 4]}


def test_the_traced_layers_compute_the_models_output() -> None:
    model = Net()
    x = torch.randn(5, 4)
    g = trace_model(model, x)
    out = g(x)
    assert out["size"] == 5 and torch.equal(out["logits"], model(x)["logits"])


def test_leaves_and_max_layers_refine_the_cut() -> None:
    model = Net()
    fine = trace_model(model, torch.ones(2, 4), leaves=[nn.Linear])
    assert "blocks.0.fc" in [la.name for la in fine.layers]
    coarse = trace_model(model, torch.ones(2, 4), max_layers=2)
    assert coarse.num_layers == 2
    assert block_paths(model, ["blocks.*"]) == {"blocks.0", "blocks.1", "blocks.2"}
    with pytest.raises(ValueError, match="no module"):
        block_paths(model, ["nothing.*"])


def test_transformers_models_are_exported_with_blocks_as_layers() -> None:
    pytest.importorskip("transformers")
    w = build_graph_model("tiny-llama", batch=2)
    g = trace_model(w.model, w.sample)
    names = [la.name for la in g.layers]
    assert g.capture.tracer == "export"
    assert names[1:4] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    # the embedding layer hands rotary tables and the mask to every block, not just the first
    assert {v for u, v, vals in g.edges if u == 0 and vals} >= {1, 2, 3}


def test_routes_go_straight_from_producer_to_consumer() -> None:
    g = trace_model(Net(), torch.ones(2, 4))
    sources, dests = route(g, [0, 1, 1, 2, 3])
    assert dests[0] == {1: ["embed"], 3: ["x", "embed"]}  # 0 -> 3 directly, not via 1 and 2
    assert sources[3] == {0: ["x", "embed"], 2: ["blocks_2"]}
    stages = graph_stages(g, [[0], [1, 2], [3], [4]], ["cpu"] * 4)
    packets = stages[0].packets(stages[0]({"x": torch.ones(2, 4)}))
    assert set(packets) == {1, 3} and packets[3].needs_grad == (False, True)


def _meta_net(tmp: str) -> tuple[Net, Net, str]:
    """A Net with real weights, the same Net built on meta, and the file of the real weights."""
    real = Net()
    path = os.path.join(tmp, "w.pt")
    save_weights(real, path)
    with torch.device("meta"):
        model = Net()
    return real, model, path


def test_a_meta_model_loads_only_its_stage() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        real, model, path = _meta_net(tmp)
        g = trace_model(model, torch.ones(2, 4, device="meta"), check=False)
        materialise([g.module_of(1)], model, path, torch.device("cpu"))
        assert not model.blocks[0].fc.weight.is_meta and model.blocks[1].fc.weight.is_meta
        assert torch.equal(model.blocks[0].fc.weight, real.blocks[0].fc.weight)
        with pytest.raises(ValueError, match="weights="):
            materialise([g.module_of(2)], model, None, torch.device("cpu"))


def test_exported_layers_reach_their_parameters_by_shortcut_and_see_swapped_ones() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        real, model, path = _meta_net(tmp)
        g = trace_model(model, torch.ones(2, 4, device="meta"), tracer="export", check=False)
        layer = g.module_of(1)
        assert {n for n, _ in layer.named_parameters()} == {"blocks.0.fc.weight",
                                                             "blocks.0.fc.bias"}
        paths = [str(n.target) for n in layer.graph.nodes if n.op == "get_attr"]
        assert paths and all("." in p for p in paths)
        for p in paths:  # every step of the path is a plain attribute: no Module.__getattr__
            holder: nn.Module = layer
            for step in p.split(".")[:-1]:
                assert vars(holder)[step] is holder._modules[step]
                holder = holder._modules[step]
        materialise([layer], model, path, torch.device("cpu"))  # swaps the parameters
        x = torch.randn(2, 4)
        (got,) = layer(x)
        assert torch.equal(got, real.blocks[0](x))


def test_a_graph_that_computes_otherwise_is_refused() -> None:
    class Sneaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1  # fx runs this once; the layers then never change it
            return self.fc(x) * self.calls

    with pytest.raises(TraceError, match="do not compute"):
        trace_model(Sneaky(), torch.ones(2, 2))
