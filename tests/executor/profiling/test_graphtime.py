"""In-context timing of a traced graph: the backward splits at the layer boundaries, in order."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from executor.graphs.layers import trace_model
from executor.profiling.graphtime import Clock, layer_bytes, time_graph_layers


class Slow(nn.Module):
    """A layer whose backward sleeps ``bwd_s``: a known cost to find in the right layer."""

    def __init__(self, bwd_s: float) -> None:
        super().__init__()
        self.bwd_s = bwd_s
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return _Sleep.apply(self.fc(x), self.bwd_s)  # type: ignore[no-any-return]


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: Tensor, s: float) -> Tensor:
        ctx.s = s  # type: ignore[attr-defined]
        return x.clone()

    @staticmethod
    def backward(ctx: object, g: Tensor) -> tuple[Tensor, None]:
        time.sleep(ctx.s)  # type: ignore[attr-defined]
        return g, None


class Skips(nn.Module):
    """Three blocks; the first feeds the last directly too (a skip over the slow middle)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Slow(0.0), Slow(0.03), Slow(0.0)])

    def forward(self, x: Tensor) -> Tensor:
        a = self.blocks[0](x)
        return self.blocks[2](self.blocks[1](a) + a)


def test_the_backward_of_a_skip_lands_in_its_own_layer() -> None:
    g = trace_model(Skips(), torch.ones(2, 4), leaves=[Slow])
    names = [layer.name for layer in g.layers]
    assert names == ["blocks.0", "blocks.1", "add", "blocks.2"] and (0, 2, ("blocks_0",)) in g.edges
    t = time_graph_layers(g, g.inputs_of((torch.ones(2, 4),), {}), Clock(torch.device("cpu")),
                          warmup=0, repeat=3)
    assert t.bwd_ms[1] >= 30 and max(t.bwd_ms[0], t.bwd_ms[2], t.bwd_ms[3]) < 15
    # within one pass the layers sum to at most the pass, exactly (across passes the medians
    # of the layers need not sum to the median of the passes)
    one = time_graph_layers(g, g.inputs_of((torch.ones(2, 4),), {}), Clock(torch.device("cpu")),
                            warmup=0, repeat=1)
    assert sum(one.fwd_ms) <= one.pass_fwd_ms and sum(one.bwd_ms) <= one.pass_bwd_ms


def test_layer_bytes() -> None:
    g = trace_model(Skips(), torch.ones(2, 4), leaves=[Slow])
    m = layer_bytes(g, g.inputs_of((torch.ones(2, 4),), {}))
    assert m.in_bytes[0] == 2 * 4 * 4 and m.out_bytes == [32, 32, 32, 32]
    assert m.saved_bytes[0] == 32  # the Linear keeps its input; its weight is no activation
    assert m.values["blocks_0"] == 32


def test_split_backward_of_a_graph_lands_in_the_layers_with_linears() -> None:
    """W of each Slow block's Linear in its own layer; the parameter-free add has none; the
    sleep of the middle block's backward is in its I."""
    g = trace_model(Skips(), torch.ones(2, 4), leaves=[Slow])
    t = time_graph_layers(g, g.inputs_of((torch.ones(2, 4),), {}), Clock(torch.device("cpu")),
                          warmup=0, repeat=2, split=True)
    assert t.bwd_input_ms is not None and t.bwd_weight_ms is not None
    assert [w > 0 for w in t.bwd_weight_ms] == [True, True, False, True]
    assert t.bwd_input_ms[1] >= 30 and max(t.bwd_input_ms[0], t.bwd_input_ms[3]) < 15
    assert t.pass_bwd_weight_ms is not None
    assert t.pass_bwd_weight_ms >= sum(t.bwd_weight_ms) - 1e-6  # the median of the sums
    plain = time_graph_layers(g, g.inputs_of((torch.ones(2, 4),), {}),
                              Clock(torch.device("cpu")), warmup=0, repeat=1)
    assert plain.bwd_input_ms is None and plain.bwd_weight_ms is None
