"""``--replicas`` and the topology on the command line: plans with D copies, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from partitioner.cli.main import main
from partitioner.formats.plan import load_plan

BASE = ["--profile", "h200/gpt2-medium", "-K", "2", "-M", "2", "-B", "32", "--schedule", "1f1b"]


def test_plan_with_replicas_on_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    assert main([*BASE, "--replicas", "4", "--nodes", "2", "--devices-per-node", "4",
                 "--inter-bandwidth", "5", "--shard-optimizer", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "x D=4 replicas (8 ranks)" in text and "replicas: layout" in text
    plan = load_plan(out)
    assert (plan.replicas, plan.world_size, plan.shard_optimizer) == (4, 8, True)
    assert plan.topology is not None and plan.topology.inter.bandwidth_gbps == 5.0
    assert main(["simulate", str(out)]) == 0
    assert "simulated step" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--replicas", "0"], "--replicas '0' must be whole numbers in 1..65536 (the copies of the "
                          "pipeline; 1: no data parallelism)"),
    (["--replicas", "3"], "B=32 does not split into 3 equal shares; give a B that is a "
                          "multiple of 3"),
    (["--replicas", "32"], "each replica gets B/D=1 samples, fewer than M=2 micro-batches; "
                           "use -M <= 1"),
    (["--replicas", "8", "--nodes", "1", "--devices-per-node", "8"],
     "R=2 ranks x D=8 replicas need 16 devices, more than the 8 of --nodes 1 "
     "--devices-per-node 8; use fewer stages or replicas, or more nodes"),
    (["--nodes", "2"], "--nodes N and --devices-per-node G go together"),
    (["--inter-link", "ib"], "describe a topology's links: give the topology too"),
])
def test_refusals_name_value_rule_and_fix(extra: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main([*BASE, *extra])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    assert message in capsys.readouterr().err
