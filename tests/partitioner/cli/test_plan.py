"""The partition-model command: output, plan file, and exit status 2 with one clear message."""

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from partitioner.cli.main import main
from partitioner.formats.plan import Prediction, load_plan
from partitioner.formats.profile import load_profile

GPT = ["--profile", "h200/gpt2-medium", "--stages", "4", "--microbatches", "4",
       "--global-batch", "16"]


def test_plans_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    assert main([*GPT, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stage" in text and "[0, 6)" in text and "predicted step" in text and "bubble" in text
    plan = load_plan(out)
    assert plan.num_stages == 4 and plan.microbatches == 4 and plan.recompute == "except_last"
    assert plan.memory_limit_bytes == 150754820096  # the profile's device memory by default


def test_plan_subcommand_name_is_optional(tmp_path: Path) -> None:
    assert main(["plan", *GPT, "-o", str(tmp_path / "a.json")]) == 0
    assert main([*GPT, "-o", str(tmp_path / "b.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert a == b


def test_free_link_and_optimizer_change_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*GPT, "--bandwidth", "inf"]) == 0
    assert "link free" in capsys.readouterr().out
    assert main([*GPT, "--bandwidth", "10", "--latency-ms", "1", "--optimizer", "sgd"]) == 0
    text = capsys.readouterr().out
    assert "10 GB/s + 1 ms" in text and "sgd (6 bytes/parameter" in text


@pytest.mark.parametrize("args,needle", [
    (["--profile", "nope", "--stages", "2", "--microbatches", "2", "--global-batch", "2"],
     "neither a file nor a shipped profile"),
    ([*GPT[:-1], "2"], "B=2 is smaller than M=4"),
    (["--profile", "h200/gpt-1.3b", "--stages", "2", "--microbatches", "4", "--global-batch",
      "16", "--memory-limit", "8GiB"], "smallest limit that fits at K=2"),
    (["--profile", "h200/gpt2-medium", "--stages", "27", "--microbatches", "4",
      "--global-batch", "16"], "K=27 stages need at least 27 layers"),
    (["--profile", "pipedream/resnet18", "--stages", "2", "--microbatches", "4",
      "--global-batch", "4", "--memory-limit", "1GiB"], "no convex partition of the 70-layer"),
])
def test_user_errors_exit_2(args: list[str], needle: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("args,needle", [
    ([*GPT, "--memory-limit", "lots"], "memory size 'lots'"),
    ([*GPT, "--memory-limit", "0.5"], "memory size '0.5' is below one byte"),
    ([*GPT, "--memory-limit", "0"], "memory size '0' is below one byte"),
    ([*GPT, "--latency-ms", "nan"], "--latency-ms 'nan' must be a number of ms"),
    ([*GPT, "--compute-scale", "inf"], "--compute-scale 'inf' must be a number > 0"),
    ([*GPT, "--bandwidth", "-1"], "bandwidth '-1'"),
    ([*GPT[:2], "--stages", "0", *GPT[4:]], "--stages '0' must be a whole number >= 1"),
    ([*GPT, "--time-limit", "0"], "--time-limit '0' must be a number of seconds > 0"),
    ([*GPT, "--solver", "milp"], "invalid choice: 'milp'"),
])
def test_bad_arguments_exit_2(args: list[str], needle: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_one_option_name_one_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    """--devices is a number of devices everywhere; the plan's per-stage list is
    --stage-devices, checked for a name per stage."""
    assert main([*GPT, "--stage-devices", "cuda:0,cuda:1,cuda:2,cuda:3"]) == 0
    assert main([*GPT, "--stage-devices", "cuda:0,,cuda:2,cuda:3"]) == 2
    assert "'' is not a device name" in capsys.readouterr().err
    assert main([*GPT, "--stage-devices", "cpu,cpu"]) == 2
    assert "2 devices given for K=4 stages" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*GPT, "--devices", "4"])


def test_graph_profile_is_planned_as_chain_with_warning(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--profile", "pipedream/resnet18", "--stages", "4", "--microbatches", "4",
                 "--global-batch", "4", "--solver", "dp"]) == 0
    assert "planning it as a chain" in capsys.readouterr().err


def bottleneck(pred: Prediction) -> float:
    return max(c + m for c, m in zip(pred.stage_compute_ms, pred.stage_comm_ms, strict=True))


RESNET = ["--profile", "pipedream/resnet18", "--stages", "8", "--microbatches", "4",
          "--global-batch", "4", "--bandwidth", "inf", "--recompute", "never"]


def data_pairs(messages: Mapping[tuple[int, int], object]) -> list[tuple[int, int]]:
    return sorted((src, dst) for src, dst in messages if src < dst)


def test_graph_profile_gets_a_graph_plan(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    assert main([*RESNET, "--time-limit", "30", "-o", str(out)]) == 0  # --solver auto
    captured = capsys.readouterr()
    assert "planning it as a chain" not in captured.err
    assert "graph-shaped plan" in captured.out and "CP-SAT, optimal" in captured.out
    assert "messages between stages, per micro-batch of 1" in captured.out
    plan = load_plan(out)
    assert plan.messages and data_pairs(plan.messages) == sorted(plan.messages)
    plan.check_against(70, load_profile("pipedream/resnet18"))
    assert plan.is_graph and sorted(i for s in plan.stages for i in s.nodes or ()) == list(
        range(70))
    data = json.loads(out.read_text())
    assert data["stages"][0]["nodes"] == sorted(data["stages"][0]["nodes"])
    # the graph plan beats the chain plan of the same profile (by 5.8% at K=8, free link)
    assert main([*RESNET, "--solver", "dp", "-o", str(tmp_path / "dp.json")]) == 0
    chain = load_plan(tmp_path / "dp.json")
    assert plan.predicted and chain.predicted and not chain.is_graph
    assert bottleneck(plan.predicted) < 0.95 * bottleneck(chain.predicted)


def test_ilp_on_a_chain_profile_matches_the_dp(tmp_path: Path) -> None:
    assert main([*GPT, "--solver", "ilp", "-o", str(tmp_path / "ilp.json")]) == 0
    assert main([*GPT, "--solver", "auto", "-o", str(tmp_path / "dp.json")]) == 0
    ilp, dp = load_plan(tmp_path / "ilp.json"), load_plan(tmp_path / "dp.json")
    # on a chain the ILP's stages are layer ranges, so its plan is a range plan, as runnable
    assert not ilp.is_graph and not dp.is_graph
    assert ilp.predicted and dp.predicted
    assert bottleneck(ilp.predicted) == pytest.approx(bottleneck(dp.predicted), rel=1e-4)


def test_console_script_runs() -> None:
    exe = Path(sys.executable).with_name("partition-model")
    result = subprocess.run([str(exe), *GPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "predicted step" in result.stdout
