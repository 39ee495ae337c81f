"""The planner's solver choice: the DP for chains (also traced ones), CP-SAT for other graphs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from partitioner import CostModel, load_profile
from partitioner.formats.plan_schedule import SYNTH
from partitioner.simulator.engine import ranges_from_boundaries, simulate
from partitioner.solve.planner import make_plan, resolve_solver
from tests.synthetic import make_profile


def test_auto_is_the_dp_for_layers_that_follow_one_another() -> None:
    chain = load_profile("h200/gpt2-medium")
    assert resolve_solver("auto", chain) == "dp"
    traced_chain = replace(chain, edges=tuple((i, i + 1) for i in range(chain.num_layers - 1)))
    assert resolve_solver("auto", traced_chain) == "dp"
    skip = replace(traced_chain, edges=(*traced_chain.edges, (0, 2)))
    assert resolve_solver("auto", skip) == "ilp"
    assert resolve_solver("ilp", chain) == "ilp"
    with pytest.raises(ValueError, match="not one of"):
        resolve_solver("fast", chain)


@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_a_synthesised_plan_runs_the_schedule_it_predicts(m: int) -> None:
    """Where no synthesised schedule beats a fixed one (GPipe at M=1: a split backward costs
    1.3 x the fused one here), the plan names that one, not the placement's: the executor runs
    what the prediction simulated."""
    prof = make_profile([3.0, 1.0, 1.0, 2.0, 0.5, 0.5], sizes=(1, 2, 4, 8))
    prof = replace(prof, layers=tuple(
        replace(layer, bwd_input_ms=tuple(0.8 * b for b in layer.bwd_ms),
                bwd_weight_ms=tuple(0.5 * b for b in layer.bwd_ms)) for layer in prof.layers))
    cm = CostModel(prof, 8, m, stages=2, schedule="zb-h1")
    plan = make_plan(cm, synthesise=True)
    assert plan.predicted is not None
    ran = simulate(replace(cm, schedule=plan.schedule if plan.schedule != SYNTH else "zb-h1"),
                   ranges_from_boundaries(plan.boundaries), schedule=plan.build_schedule(),
                   record=False)
    assert ran.step_ms == pytest.approx(plan.predicted.step_ms, rel=1e-9)
    assert plan.schedule == SYNTH or plan.actions is None
    if m == 1:
        assert plan.schedule in ("gpipe", "1f1b")  # the split costs more than the bubble saves
