"""``partition-model profile``: built-in and user models, the written profile, and exit status 2
with one clear message for each user error."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from executor.runtime.devices import cpu_l2_bytes
from partitioner.cli.main import main
from partitioner.formats.profile import load_profile

FAST = ["--warmup", "0", "--repeat", "1", "--threads", "1"]

USER_MODULE = """
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)), torch.randn(4, 6)

def not_sequential():
    return nn.Linear(6, 5), torch.randn(4, 6)

def not_a_pair():
    return nn.Sequential(nn.Linear(6, 5))

def bad_sample():
    return nn.Sequential(nn.Linear(6, 5)), [1, 2, 3]

def not_a_model():
    return 3

class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + x

def sample(b):
    return torch.ones(b, 6)
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "user_models_for_profile_cli"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_list_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--list-models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("gpt-tiny", "gpt2-medium", "resnet-tiny", "resnet50",
                                        "tiny-gpt2", "tiny-llama", "tiny-unet"))


def test_profiles_a_built_in_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpt.json"
    assert main(["profile", "--model", "gpt-tiny", "--microbatch-sizes", "2,1",
                 "--dtype", "bfloat16", *FAST, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Embed" in text and "Head" in text and f"wrote {out}" in text
    prof = load_profile(out)
    assert prof.model == "gpt-tiny" and prof.microbatch_sizes == (1, 2)
    assert prof.num_layers == 6 and prof.dtype == "bfloat16"
    assert prof.input is not None and prof.input["kind"] == "tokens"
    assert prof.extra["harness"]["threads"] == 1 and prof.extra["harness"]["repeat"] == 1
    # by default the layers are timed inside the whole model (it fits), with no flush
    assert prof.extra["harness"]["timing"] == "model" and prof.extra["harness"]["flush_bytes"] == 0
    assert "layers timed inside the whole model" in text
    # alone, each timed region starts with the caches flushed past one core's L2 when the
    # model's weights do not fit in it
    assert main(["profile", "--model", "gpt-small", "--microbatch-sizes", "1", *FAST,
                 "--timing", "layer", "-o", str(out)]) == 0
    alone = load_profile(out)
    weights = sum(lay.param_bytes for lay in alone.layers)
    assert weights > cpu_l2_bytes() and "layers timed alone" in capsys.readouterr().out
    assert alone.extra["harness"]["timing"] == "layer"
    assert alone.extra["harness"]["flush_bytes"] == 2 * cpu_l2_bytes()
    assert main(["profile", "--model", "gpt-tiny", "--microbatch-sizes", "1", *FAST,
                 "--timing", "layer", "--flush", "0", "-o", str(out)]) == 0
    assert load_profile(out).extra["harness"]["flush_bytes"] == 0


def test_split_backward_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    out = tmp_path / "gpt.json"
    assert main(["profile", "--model", "gpt-tiny", "--microbatch-sizes", "1", *FAST,
                 "-o", str(out)]) == 0
    prof = load_profile(out)
    assert all(lay.bwd_input_ms and lay.bwd_weight_ms for lay in prof.layers)
    assert prof.layers[0].bwd_weight_ms == (0.0,) and prof.layers[1].bwd_weight_ms[0] > 0
    assert main(["profile", "--model", "gpt-tiny", "--microbatch-sizes", "1", *FAST,
                 "--split-backward", "off", "-o", str(out)]) == 0
    off = load_profile(out)
    assert all(lay.bwd_input_ms is None and lay.bwd_weight_ms is None for lay in off.layers)
    assert off.extra["harness"]["split_backward"] is None


def test_profiles_a_user_function(tmp_path: Path, user_module: str) -> None:
    out = tmp_path / "user.json"
    assert main(["profile", "--model", f"{user_module}:make", "--microbatch-sizes", "1,4",
                 "--clock", "thread", *FAST, "-o", str(out)]) == 0
    prof = load_profile(out)
    assert [lay.type for lay in prof.layers] == ["Linear", "Tanh", "Linear"]
    assert prof.layers[0].in_bytes == (6 * 4, 4 * 6 * 4)
    assert prof.input == {"source": f"{user_module}:make", "sample_shape": [6],
                          "sample_dtype": "float32"}


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "gpt-huge"], "neither a built-in model"),
    (["--model", "no_such_module_here:make"], "cannot import module"),
    (["--model", "{m}:missing"], "has no 'missing'"),
    (["--model", "{m}:not_a_model"], "returning an nn.Module or (nn.Module, sample_batch)"),
    (["--model", "{m}:not_a_pair"], "comes without a sample and is not a Transformers model"),
    (["--model", "{m}:Skip", "--input-shape", "6", "--leaf", "{m}:sample"],
     "is not an nn.Module class"),
    (["--model", "{m}:Skip", "--sample", "{m}:sample", "--leaf", "nothing.*"],
     "no module of Skip matches the leaves"),
    (["--model", "{m}:not_sequential", "--timing", "layer"], "timed only inside passes"),
    (["--model", "{m}:bad_sample"], "the sample batch is a list"),
    (["--model", "{m}:make", "--microbatch-sizes", "2,8"], "[8] are larger than the sample"),
    (["--model", "gpt-tiny", "--batch", "2", "--microbatch-sizes", "4"], "larger than the"),
    (["--model", "gpt-tiny", "--threads", "2", "--clock", "thread"], "needs threads=1"),
    (["--model", "gpt-tiny", "--dtype", "int8"], "dtype 'int8' is not one of"),
    (["--model", "gpt-tiny", "--timing", "alone"], "timing='alone' is not one of"),
    ([], "give --model"),
])
def test_user_errors_exit_2_with_a_message(args: list[str], message: str, user_module: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.replace("{m}", user_module) for a in args]
    assert main(["profile", *args, "--warmup", "0", "--repeat", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("partition-model profile: error:") and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_missing_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", "gpt-tiny", "--device", "cuda"]) == 2
    assert "needs CUDA, which this machine lacks" in capsys.readouterr().err


def test_bad_option_values_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (["--microbatch-sizes", "0,2"], ["--microbatch-sizes", "a"], ["--repeat", "0"],
                ["--flush", "lots"]):
        with pytest.raises(SystemExit) as exc:
            main(["profile", "--model", "gpt-tiny", *bad])
        assert exc.value.code == 2
    assert "must list whole numbers >= 1" in capsys.readouterr().err


def test_profiles_a_user_graph_model(tmp_path: Path, user_module: str) -> None:
    out = tmp_path / "skip.json"
    for how in (["--input-shape", "6"], ["--sample", f"{user_module}:sample"]):
        assert main(["profile", "--model", f"{user_module}:Skip", *how, "--microbatch-sizes",
                     "1,2", "--leaf", "torch.nn:Linear", *FAST, "-o", str(out)]) == 0
        prof = load_profile(out)
        assert [lay.name for lay in prof.layers] == ["a", "relu", "b", "add"]
        assert prof.edges is not None and (0, 3) in prof.edges  # x skips to the add
        assert prof.extra["trace"]["leaves"] == ["torch.nn.modules.linear:Linear"]
    # a (model, sample) pair of any module; profile-graph is another name for profile
    assert main(["profile-graph", "--model", f"{user_module}:not_sequential", *FAST,
                 "--microbatch-sizes", "1", "-o", str(out)]) == 0
    assert load_profile(out).extra["trace"]["tracer"] == "fx"


@pytest.mark.timeout(120)
def test_profile_a_transformers_model_then_plan_it(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "llama.json"
    assert main(["profile", "--model", "tiny-llama", "--microbatch-sizes", "1,2", *FAST,
                 "-o", str(out)]) == 0
    assert "tiny-llama traced with export into 5 layers: 6 edges" in capsys.readouterr().out
    prof = load_profile(out)
    assert prof.extra["trace"]["layer_names"][1] == "model.layers.0"
    assert main(["--profile", str(out), "--stages", "2", "--microbatches", "2",
                 "--global-batch", "4", "-o", str(tmp_path / "plan.json")]) == 0
    text = capsys.readouterr().out
    assert "solver: CP-SAT" in text and f"wrote {tmp_path / 'plan.json'}" in text
