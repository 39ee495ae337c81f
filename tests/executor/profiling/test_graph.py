"""Graph profiles from torch.fx: edges of a U-Net-like model, figures, and its ILP partition."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from executor.profiling.graph import profile_graph, trace_layers
from partitioner.cli.main import main
from partitioner.cost.model import CostModel
from partitioner.formats.layers import assignment_problems, layer_edges
from partitioner.formats.plan import load_plan
from partitioner.formats.profile import load_profile, profile_from_dict, profile_to_dict
from partitioner.solve.ilp import partition_graph


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class TinyUNet(nn.Module):
    """Two levels down, one up, with the skip from the first level to the decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2 = Block(3, 4), Block(4, 8)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2)
        self.dec = Block(12, 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc1(x)
        b = self.enc2(self.pool(a))
        return self.head(self.dec(torch.cat([self.up(b), a], dim=1)))


def test_unet_edges_and_figures() -> None:
    model = TinyUNet()
    before = copy.deepcopy(model.state_dict())
    prof = profile_graph(model, torch.randn(2, 3, 8, 8), (1, 2), repeats=2)
    names = [lay.name for lay in prof.layers]
    # enc1.conv, relu, pool, enc2.conv, relu_1, up, cat, dec.conv, relu_2, head
    assert [lay.type for lay in prof.layers] == ["Conv2d", "relu", "MaxPool2d", "Conv2d", "relu",
                                                 "Upsample", "cat", "Conv2d", "relu", "Conv2d"]
    skip = (names.index("relu"), names.index("cat"))
    assert prof.edges is not None and skip in prof.edges  # the U-Net skip jumps ahead
    assert len(prof.edges) == 10 and all(u < v for u, v in prof.edges)
    assert profile_from_dict(profile_to_dict(prof)) == prof  # valid gpipe-profile/1
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(lay.param_bytes for lay in prof.layers) == params
    conv1 = prof.layers[0]
    assert conv1.out_bytes == (4 * 8 * 8 * 4, 2 * 4 * 8 * 8 * 4)  # (b, 4, 8, 8) float32
    assert conv1.in_bytes == (3 * 8 * 8 * 4, 2 * 3 * 8 * 8 * 4)
    assert prof.layers[6].in_bytes[0] == (8 + 4) * 8 * 8 * 4  # cat reads both branches
    assert conv1.saved_bytes[0] >= conv1.in_bytes[0]  # conv keeps its input for the weight grad
    assert all(f > 0 for lay in prof.layers for f in lay.fwd_ms)
    assert all(lay.bwd_ms[0] > 0 for lay in prof.layers)
    # the user's model is untouched and keeps no gradients
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_leaf_modules_make_one_layer_per_block() -> None:
    _, layers, edges = trace_layers(TinyUNet(), leaf_modules=[Block])
    assert [n.name for n in layers] == ["enc1", "pool", "enc2", "up", "cat", "dec", "head"]
    assert (0, 4) in edges  # enc1 -> cat, the skip


@pytest.mark.timeout(120)
def test_the_ilp_partitions_the_unet() -> None:
    prof = profile_graph(TinyUNet(), torch.randn(2, 3, 8, 8), (1, 2), repeats=1)
    cm = CostModel(prof, 4, 2, stages=3)
    sol = partition_graph(cm, time_limit_s=30)
    assert sol.status == "optimal" and all(sol.nodes)
    assert not assignment_problems(prof.num_layers, layer_edges(prof), sol.stage_of, 3)


@pytest.mark.timeout(120)
def test_profile_graph_command_then_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    out = tmp_path / "unet.json"
    here = "tests.executor.profiling.test_graph"
    assert main(["profile-graph", "--model", f"{here}:TinyUNet", "--input-shape", "3,8,8",
                 "--microbatch-sizes", "1,2", "--repeat", "1", "--leaf", f"{here}:Block",
                 "-o", str(out)]) == 0
    assert "7 layers, 7 edges" in capsys.readouterr().out
    assert main(["--profile", str(out), "--stages", "2", "--microbatches", "2",
                 "--global-batch", "4", "-o", str(tmp_path / "plan.json")]) == 0
    assert "solver: CP-SAT" in capsys.readouterr().out
    plan = load_plan(tmp_path / "plan.json")
    plan.check_against(7, load_profile(out))  # a convex partition of the traced graph
    assert plan.num_stages == 2
    assert main(["profile-graph", "--model", "nowhere", "--input-shape", "3", "-o",
                 str(out)]) == 2
    assert "is not of the form module:function" in capsys.readouterr().err
