"""The planner's solver choice: the DP for chains (also traced ones), CP-SAT for other graphs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from partitioner import load_profile
from partitioner.solve.planner import resolve_solver


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
