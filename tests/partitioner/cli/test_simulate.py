"""The simulate and search subcommands: figures, overrides, files written, clear errors."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from partitioner.cli.main import main
from partitioner.cost.model import CostModel
from partitioner.formats.assumptions import Runtime
from partitioner.formats.device import load_device_model
from partitioner.formats.plan import PlanError, load_plan, save_plan
from partitioner.formats.profile import load_profile
from partitioner.formats.timeline import load_chrome_trace
from partitioner.simulator.engine import ranges_from_boundaries, simulate
from partitioner.simulator.plans import find_profile, simulate_plan

PLAN = ["--profile", "h200/gpt2-medium", "--stages", "4", "--microbatches", "4",
        "--global-batch", "16"]


@pytest.fixture
def plan_path(tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    assert main([*PLAN, "-o", str(path)]) == 0
    return path


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, object]:
    capsys.readouterr()
    assert main(argv) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_simulate_prints_and_agrees_with_the_plan(plan_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["simulate", str(plan_path)]) == 0
    text = capsys.readouterr().out
    assert "simulated step" in text and "peak_memory" in text and "[0, 6)" in text
    data = _json(capsys, ["simulate", str(plan_path), "--json"])
    assert set(data) >= {"step_ms", "bubble_fraction", "stage_busy_ms", "stage_peak_bytes"}
    plan = load_plan(plan_path)
    assert plan.predicted is not None
    assert data["step_ms"] == pytest.approx(plan.predicted.step_ms)
    assert data["stage_peak_bytes"] == pytest.approx(list(plan.predicted.stage_peak_bytes))


def test_what_if_overrides(plan_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _json(capsys, ["simulate", str(plan_path), "--json"])
    one = _json(capsys, ["simulate", str(plan_path), "--json", "--devices", "1"])
    busy = one["stage_busy_ms"]
    assert isinstance(busy, list)
    assert one["step_ms"] == pytest.approx(sum(busy))  # one device: back to back, no sends
    assert one["bubble_fraction"] == pytest.approx(0.0, abs=1e-12)
    slow = _json(capsys, ["simulate", str(plan_path), "--json", "--bandwidth", "1",
                          "--latency-ms", "1"])
    free = _json(capsys, ["simulate", str(plan_path), "--json", "--bandwidth", "inf",
                          "--latency-ms", "0"])
    assert float(free["step_ms"]) < float(base["step_ms"]) < float(slow["step_ms"])  # type: ignore[arg-type]
    more = _json(capsys, ["simulate", str(plan_path), "--json", "--microbatches", "8",
                          "--schedule", "1f1b"])
    profile = load_profile("h200/gpt2-medium")
    cm = CostModel(profile, 16, 8, stages=4, schedule="1f1b", recompute="except_last",
                   link=load_plan(plan_path).link, runtime=load_plan(plan_path).runtime)
    expect = simulate(cm, ranges_from_boundaries(load_plan(plan_path).boundaries))
    assert more["step_ms"] == pytest.approx(expect.step_ms)


def test_trace_and_png(plan_path: Path, tmp_path: Path) -> None:
    trace, png = tmp_path / "t.json", tmp_path / "g.png"
    assert main(["simulate", str(plan_path), "--trace", str(trace), "--png", str(png)]) == 0
    tl = load_chrome_trace(trace)
    assert tl.stages == 4 and tl.kind == "predicted"
    assert sum(e.action.kind == "F" for e in tl.events) == 16
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_profile_is_found_and_checked(plan_path: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    plan = load_plan(plan_path)
    assert find_profile(plan).sha256() == plan.profile_sha256
    other = replace(plan, profile_sha256="0" * 64)
    with pytest.raises(PlanError, match="not among the shipped profiles"):
        find_profile(other)
    bad = tmp_path / "bad.json"
    save_plan(other, bad)
    assert main(["simulate", str(bad), "--profile", "h200/gpt2-medium"]) == 2
    assert "plan again from this profile" in capsys.readouterr().err
    assert main(["simulate", str(plan_path), "--devices", "5"]) == 2
    assert "runs on 1..4 devices" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"runs on 1\.\.4 devices"):
        simulate_plan(plan, find_profile(plan), num_devices=0)


def test_search_writes_the_best_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "best.json"
    capsys.readouterr()
    assert main(["search", "--profile", "h200/gpt2-medium", "--devices", "3",
                 "--global-batch", "8", "--schedules", "gpipe,1f1b", "--recompute",
                 "never,always", "--top", "4", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "configurations tried" in text and "rank" in text and "best: K=" in text
    best = load_plan(out)
    assert best.predicted is not None and best.predicted.method == "simulated"
    first_row = text.split("rank")[1].splitlines()[1].split()
    assert (int(first_row[1]), int(first_row[2])) == (best.num_stages, best.microbatches)
    assert float(first_row[6]) == pytest.approx(best.predicted.step_ms, abs=0.01)


@pytest.mark.parametrize("args,needle", [
    (["--memory-limit", "1GiB"], "none of the"),
    (["--schedules", "zigzag"], "'zigzag' is not one of gpipe, 1f1b"),
    (["--microbatches", "1,x"], "must list whole numbers >= 1"),
    (["--microbatches", "1,4", "--global-batch", "2"], "1 <= M <= B=2"),
])
def test_search_errors_exit_2(args: list[str], needle: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["search", "--profile", "h200/gpt2-medium", "--devices", "2", "--global-batch",
            "4", *args]
    try:
        assert main(argv) == 2
    except SystemExit as exc:  # argparse's own usage errors
        assert exc.code == 2
    assert needle in capsys.readouterr().err


GRAPH_SEARCH = ["search", "--profile", "pipedream/resnet18", "--devices", "3",
                "--global-batch", "4", "--recompute", "never,always", "--link", "pcie"]


def test_search_on_a_graph_profile_uses_the_ilp(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """auto: CP-SAT on the layer graph, M from the short list, each partition's status in the
    table; the best plan is graph-shaped and `simulate` replays it to its prediction."""
    out = tmp_path / "best.json"
    capsys.readouterr()
    assert main([*GRAPH_SEARCH, "--time-limit", "20", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "M in 1,2,4," in text and "solved by CP-SAT on the layer graph" in text
    assert "at most 20 s each" in text and "partition" in text.split("\n")[2]
    first_row = text.split("rank")[1].splitlines()[1].split()
    assert first_row[10] == "optimal"
    best = load_plan(out)
    best.check_against(70, load_profile("pipedream/resnet18"))  # a convex partition
    assert best.predicted is not None
    assert float(first_row[6]) == pytest.approx(best.predicted.step_ms, abs=0.01)
    data = _json(capsys, ["simulate", str(out), "--json"])
    assert data["step_ms"] == pytest.approx(best.predicted.step_ms)
    one = _json(capsys, ["simulate", str(out), "--json", "--devices", "1"])
    assert one["step_ms"] == pytest.approx(sum(one["stage_busy_ms"]))  # type: ignore[arg-type]
    assert main(["simulate", str(out)]) == 0
    header = capsys.readouterr().out.split("\n")[2]
    assert ("nodes" if best.is_graph else "layers") in header
    # the DP splits the layer order: never faster here, and the table says what it is
    assert main([*GRAPH_SEARCH, "--solver", "dp", "--microbatches", "1,2,4"]) == 0
    captured = capsys.readouterr()
    assert "layer order" in captured.out and "planning it as a chain" in captured.err
    dp_row = captured.out.split("rank")[1].splitlines()[1].split()
    assert float(dp_row[6]) >= float(first_row[6]) - 0.01


def test_runtime_options_scale_the_prediction(plan_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    base = _json(capsys, ["simulate", str(plan_path), "--json", "--bandwidth", "inf",
                          "--latency-ms", "0"])
    slow = _json(capsys, ["simulate", str(plan_path), "--json", "--bandwidth", "inf",
                          "--latency-ms", "0", "--compute-scale", "2"])
    assert float(slow["step_ms"]) == pytest.approx(2 * float(base["step_ms"]))  # type: ignore[arg-type]
    out = plan_path.parent / "slow.json"
    assert main([*PLAN, "--compute-scale", "1.5", "--action-ms", "0.1", "--message-ms", "0.2",
                 "-o", str(out)]) == 0
    assert "runtime: actions take 1.5 x profiled + 0.1 ms" in capsys.readouterr().out
    plan = load_plan(out)
    assert plan.runtime == Runtime(1.5, 0.1, 0.2, load_device_model("h200"))  # auto: an H200
    again = _json(capsys, ["simulate", str(out), "--json"])  # the plan's own runtime
    assert plan.predicted is not None
    assert float(again["step_ms"]) == pytest.approx(plan.predicted.step_ms)  # type: ignore[arg-type]
    with pytest.raises(SystemExit):
        main([*PLAN, "--compute-scale", "0"])
    assert "--compute-scale '0' must be a number > 0" in capsys.readouterr().err
