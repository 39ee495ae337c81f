"""The tools run end to end in their quick modes (their figures are read in the tools themselves)."""

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def run_tool(name: str, *args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, str(TOOLS / name), *args], capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.timeout(300)
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_tool("demo.py", "--out", str(out), "--steps", "4")
    for name in ("profile.json", "plan.json", "predicted.json", "measured.json",
                 "timelines.png"):
        assert (out / name).stat().st_size > 0, name
    assert "predicted step" in result.stdout and "error" in result.stdout


@pytest.mark.timeout(300)
def test_bench_fidelity_quick() -> None:
    result = run_tool("bench_fidelity.py", "--quick", "--alone")
    assert "median |error| of the step time over 2 configurations" in result.stdout


@pytest.mark.timeout(300)
def test_bench_simulate_quick() -> None:
    result = run_tool("bench_simulate.py", "--quick")
    assert "simulate_s" in result.stdout and "configs" in result.stdout


@pytest.mark.timeout(300)
def test_bench_partition_quick() -> None:
    result = run_tool("bench_partition.py", "--quick")
    assert "equal_layers" in result.stdout and "param_geomean" in result.stdout


@pytest.mark.timeout(300)
def test_bench_ilp_quick() -> None:
    result = run_tool("bench_ilp.py", "--quick")
    assert "ilp/dp-1" in result.stdout and "gain mean" in result.stdout
    chain_rows = result.stdout.split("== 200-layer chain")[1].split("\n== ")[0]
    assert chain_rows.count("optimal") == 4  # all four chain cases proven optimal


@pytest.mark.timeout(300)
def test_fuzzed_inputs_end_in_clean_errors_or_results() -> None:
    """500 mutated profiles, plans, traces and command lines: no traceback, hang or wrong result
    (the full run, --cases 10000, is in README)."""
    result = run_tool("fuzz_inputs.py", "--cases", "500", "--quiet", "--seed", "7")
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("cases=500 ") and last.endswith(" crashes=0"), result.stdout[-3000:]
    counts = dict(part.split("=") for part in last.split())
    assert int(counts["clean_errors"]) > 100 and int(counts["ok"]) > 20  # both paths exercised


@pytest.mark.timeout(300)
def test_bench_graph_tiny() -> None:
    result = run_tool("bench_graph.py", "--pipedream", "resnet18", "--ks", "2,3",
                      "--case-limit", "5", "--traced-layers", "120", "--traced-stages", "4",
                      "--traced-limit", "20")
    rows = [line for line in result.stdout.splitlines()
            if line.startswith(("pipedream/resnet18", "unet"))]
    assert len(rows) == 4 and all("optimal" in row for row in rows), result.stdout
    assert "chain/cvx" in result.stdout and "equal/cvx" in result.stdout
    traced = result.stdout.split("== traced-like-")[1]
    assert "status optimal" in traced or "status gap" in traced


def test_the_graph_example_trains_a_unet_on_two_ranks() -> None:
    out = run_tool("examples/train_graph.py", "--model", "tiny-unet", "--steps", "4").stdout
    assert "traced into 10 layers" in out
    first, last = (float(x) for x in out.rsplit("loss ", 1)[1].split(" in ")[0].split(" -> "))
    assert last < first  # it learns


@pytest.mark.timeout(300)
def test_soak_short_keeps_each_ranks_memory() -> None:
    # the soak's memory goal on a short run (the step time's drift is printed, not asserted:
    # on a shared machine a window of steps moves by 10-20% with the host's load)
    result = run_tool("soak.py", "--steps", "60", "--settle", "20", "--job",
                      "executor.workloads.jobs:demo")
    last = result.stdout.strip().splitlines()[-1]
    figures = dict(item.split("=") for item in last.split())
    assert float(figures["rss_growth"]) <= 0.05, result.stdout
    assert float(figures["step_drift"]) >= 0.0 and float(figures["cpu_drift"]) >= 0.0
    assert result.stdout.count("median step ms per 20 steps") == 2


@pytest.mark.timeout(300)
def test_bench_faults_ends_names_and_resumes() -> None:
    # two of the matrix's kinds (the whole matrix, hang included, is the tool's own run)
    result = run_tool("bench_faults.py", "--kinds", "backward-kill,wrong-shape")
    assert result.stdout.strip().splitlines()[-1] == (
        "cases=2 ended_in_60s=2 named=2 resumed_equal=2"), result.stdout
    assert "in action 1F0" in result.stdout  # the wrong shape's receiver says where
