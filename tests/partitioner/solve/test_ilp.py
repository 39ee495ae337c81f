"""The CP-SAT graph partitioner: brute force on small DAGs, the chain DP on chains."""

import dataclasses
import itertools
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.cost.model import CostModel
from partitioner.cost.partition import Solution, evaluate_assignment
from partitioner.formats.assumptions import Link
from partitioner.formats.layers import assignment_problems, layer_edges
from partitioner.formats.profile import Profile, load_profile
from partitioner.solve import ilp
from partitioner.solve.chain import partition_chain
from partitioner.solve.ilp import SolveTimeoutError, min_memory_graph, partition_graph
from partitioner.solve.infeasible import InfeasibleError
from tests.synthetic import llama_like, make_profile, with_saved_parts, with_values

LINKS = [Link(math.inf, 0.0), Link(1e-6, 0.0), Link(1e-6, 0.5)]
values = st.floats(0.0, 10.0, allow_nan=False).map(lambda x: round(x, 3))
byte_values = st.integers(0, 1000)


def brute_force(cm: CostModel, limit: float) -> float | None:
    """Smallest bottleneck over every convex assignment of L layers to K non-empty stages."""
    n, k, edges = cm.profile.num_layers, cm.stages, layer_edges(cm.profile)
    best = None
    for stage_of in itertools.product(range(k), repeat=n):
        if assignment_problems(n, edges, stage_of, k):
            continue
        sol = evaluate_assignment(cm, stage_of)
        if max(sol.stage_memory_bytes) <= limit * (1 + 1e-9) and (
                best is None or sol.bottleneck_ms < best):
            best = sol.bottleneck_ms
    return best


@st.composite
def instances(draw: st.DrawFn, graph: bool) -> tuple[CostModel, float]:
    n = draw(st.integers(1, 7 if graph else 9))
    k = draw(st.integers(1, min(n, 3 if graph else 5)))
    out = draw(st.lists(byte_values, min_size=n, max_size=n))
    prof = make_profile(
        draw(st.lists(values, min_size=n, max_size=n)),
        draw(st.lists(values, min_size=n, max_size=n)),
        param_bytes=draw(st.lists(st.integers(0, 500).map(lambda x: 4 * x), min_size=n,
                                  max_size=n)),
        out_bytes=out, saved_bytes=draw(st.lists(byte_values, min_size=n, max_size=n)),
        in_bytes=[draw(byte_values), *out[:-1]], sizes=(1, 2))
    if graph:
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        prof = dataclasses.replace(prof, edges=tuple(p for p in pairs if draw(st.booleans())))
    m = draw(st.integers(1, 6))
    cm = CostModel(prof, draw(st.integers(m, 3 * m)), m, stages=k,
                   recompute=draw(st.sampled_from(["never", "always", "except_last"])),
                   schedule=draw(st.sampled_from(["gpipe", "1f1b", "zb-h1"])),
                   link=draw(st.sampled_from(LINKS)),
                   optimizer=draw(st.sampled_from(["none", "sgd", "adam"])))
    limit_kind = draw(st.sampled_from(["none", "tight", "random"]))
    if limit_kind == "none":
        return cm, math.inf
    # around the memory of a valid assignment (stages in layer order), so both outcomes occur
    cuts = [0, *sorted(draw(st.permutations(range(1, n)))[: k - 1]), n]
    stage_of = [s for s in range(k) for _ in range(cuts[s], cuts[s + 1])]
    mem = max(evaluate_assignment(cm, stage_of).stage_memory_bytes)
    return cm, mem if limit_kind == "tight" else mem * draw(st.floats(0.3, 1.2))


def check_against(cm: CostModel, limit: float, expected: float | None) -> Solution | None:
    if expected is None:
        with pytest.raises(InfeasibleError, match="smallest limit that fits"):
            partition_graph(cm, limit, time_limit_s=30, workers=1)
        return None
    sol = partition_graph(cm, limit, time_limit_s=30, workers=1)
    assert sol.status == "optimal"
    # The integer scaling of times may pick a partition up to twice the stated rounding bound
    # worse; that bound is a few parts per million of the model's total time.
    assert expected - 1e-9 <= sol.bottleneck_ms <= expected + 2 * sol.rounding_error_ms + 1e-9
    fwd, out = cm.layer_array("fwd_ms"), cm.layer_array("out_bytes")
    total = float(2 * fwd.sum() + cm.layer_array("bwd_ms").sum()) + 2 * cm.stages * sum(
        cm.link.transfer_ms(float(b)) for b in out)
    assert sol.rounding_error_ms <= 1e-5 * total
    assert sol.lower_bound_ms <= expected + 1e-9
    assert max(sol.stage_memory_bytes) <= limit * (1 + 1e-9)
    assert not assignment_problems(cm.profile.num_layers, layer_edges(cm.profile),
                                   sol.stage_of, cm.stages)
    assert sol == dataclasses.replace(evaluate_assignment(cm, sol.stage_of), status=sol.status,
                                      lower_bound_ms=sol.lower_bound_ms,
                                      rounding_error_ms=sol.rounding_error_ms,
                                      time_limit_s=30, solve_s=sol.solve_s)
    return sol


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(graph=False))
def test_chains_equal_the_dp(case: tuple[CostModel, float]) -> None:
    cm, limit = case
    try:
        expected: float | None = partition_chain(cm, limit).bottleneck_ms
    except InfeasibleError:
        expected = None
    sol = check_against(cm, limit, expected)
    assert sol is None or sol.is_ranges


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(graph=False), st.integers(0, 2**32))
def test_exact_chain_terms_keep_the_ilp_safe(case: tuple[CostModel, float], seed: int) -> None:
    """On a chain profile that says what its layers share, the CP-SAT model's per-layer
    memory is an upper bound of the exact terms (ActivationTerms.bound): every partition it
    returns fits, by the exact rule, and none beats the exact DP."""
    cm, limit = case
    cm = dataclasses.replace(cm, profile=with_saved_parts(cm.profile, random.Random(seed)))
    assert cm.activations().exact
    try:
        sol = partition_graph(cm, limit, time_limit_s=30, workers=1, explain=False)
    except InfeasibleError:
        return
    assert max(sol.stage_memory_bytes) <= limit * (1 + 1e-9)  # evaluated exactly
    assert sol.bottleneck_ms >= partition_chain(cm, limit).bottleneck_ms - 1e-9


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(graph=True))
def test_graphs_equal_brute_force(case: tuple[CostModel, float]) -> None:
    cm, limit = case
    check_against(cm, limit, brute_force(cm, limit))


def test_branchy_model_beats_every_split_of_its_layer_order() -> None:
    cm = CostModel(load_profile("pipedream/resnet18"), 4, 4, stages=8)  # free link
    sol = partition_graph(cm, time_limit_s=60)
    chain = partition_graph(cm, time_limit_s=60, chain_order=True)
    assert sol.status == chain.status == "optimal"
    assert chain.is_ranges and not sol.is_ranges
    # With a free link and no memory limit the DP's bottleneck is the graph cost of its split.
    assert chain.bottleneck_ms == pytest.approx(partition_chain(cm).bottleneck_ms, rel=1e-5)
    assert sol.bottleneck_ms < 0.95 * chain.bottleneck_ms  # the graph partition wins by > 5%


def test_never_worse_than_the_chain_hint_on_a_real_graph() -> None:
    cm = CostModel(load_profile("pipedream/inception_v3"), 4, 4, stages=4,
                   recompute="except_last", link=Link(50.0, 0.02))
    cuts = partition_chain(cm).boundaries
    hint = evaluate_assignment(cm, [k for k in range(4) for _ in range(cuts[k], cuts[k + 1])])
    sol = partition_graph(cm, time_limit_s=20)
    assert sol.bottleneck_ms <= hint.bottleneck_ms + 1e-9
    assert sol.lower_bound_ms <= sol.bottleneck_ms and 0 <= sol.gap <= 1
    assert sol.status in ("optimal", "feasible") and sol.time_limit_s == 20


def test_infeasible_says_what_fits() -> None:
    prof = make_profile([1.0] * 6, param_bytes=[400] * 6, out_bytes=[10.0] * 6)
    prof = dataclasses.replace(prof, edges=((0, 1), (1, 2), (0, 3), (3, 4), (2, 5), (4, 5)))
    cm = CostModel(prof, 1, 1, stages=2, optimizer="none")  # 800 bytes of state per layer
    with pytest.raises(InfeasibleError) as info:
        partition_graph(cm, 2000)
    msg = str(info.value)
    assert "no convex partition of the 6-layer graph into K=2" in msg
    assert "smallest limit that fits at K=2: 2.34 KiB" in msg  # 3 layers per stage
    sol, bound, proven = min_memory_graph(cm)
    assert proven and max(sol.stage_memory_bytes) == 2400 and bound <= 2400
    assert partition_graph(cm, 2400).bottleneck_ms == 9.0
    with pytest.raises(InfeasibleError, match="K=7 stages need at least 7 layers"):
        partition_graph(dataclasses.replace(cm, stages=7))


def test_time_limit_without_any_solution(monkeypatch: pytest.MonkeyPatch) -> None:
    cm = CostModel(load_profile("pipedream/nasnetamobile"), 4, 4, stages=8, link=Link(50, 0.02))
    monkeypatch.setattr(ilp, "_chain_hint", lambda cm, limit: None)
    with pytest.raises(SolveTimeoutError, match="give it more time"):
        partition_graph(cm, time_limit_s=0.01)


def test_time_limit_falls_back_on_the_chain_hint() -> None:
    cm = CostModel(load_profile("pipedream/nasnetamobile"), 4, 4, stages=8, link=Link(50, 0.02))
    sol = partition_graph(cm, time_limit_s=0.01)
    assert sol.status == "feasible" and 0 <= sol.gap <= 1 and sol.time_limit_s == 0.01


def chain_profile() -> Profile:
    return make_profile([1.0, 2.0, 3.0, 4.0])


def test_chain_profile_without_edges() -> None:
    sol = partition_graph(CostModel(chain_profile(), 1, 1, stages=2))
    assert sol.nodes == ((0, 1, 2), (3,)) and sol.bottleneck_ms == 18.0


@st.composite
def valued_instances(draw: st.DrawFn) -> tuple[CostModel, float]:
    """``instances(graph=True)`` with listed outputs, edges that read some of them or nothing,
    and tied parameters (``synthetic.with_values``)."""
    cm, _ = draw(instances(graph=True))
    prof = with_values(random.Random(draw(st.integers(0, 2**32))), cm.profile)
    cm = dataclasses.replace(cm, profile=prof)
    limit_kind = draw(st.sampled_from(["none", "tight", "random"]))
    if limit_kind == "none":
        return cm, math.inf
    n, k = prof.num_layers, cm.stages
    cuts = [0, *sorted(draw(st.permutations(range(1, n)))[: k - 1]), n]
    stage_of = [s for s in range(k) for _ in range(cuts[s], cuts[s + 1])]
    mem = max(evaluate_assignment(cm, stage_of).stage_memory_bytes)
    return cm, mem if limit_kind == "tight" else mem * draw(st.floats(0.3, 1.2))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valued_instances())
def test_graphs_with_values_and_ties_equal_brute_force(case: tuple[CostModel, float]) -> None:
    cm, limit = case
    check_against(cm, limit, brute_force(cm, limit))


def test_multi_value_layers_and_ordering_edges_by_hand() -> None:
    """The llama-like graph at K=3 with a 1 GB/s link: the ILP's optimum is the brute-force
    one, and its figures are the evaluator's (mask, cos and sin carry no gradient back)."""
    cm = CostModel(llama_like(), 2, 1, stages=3, link=Link(1.0, 0.5), optimizer="none")
    sol = check_against(cm, math.inf, brute_force(cm, math.inf))
    assert sol is not None and sol.stage_of in ((0, 1, 2, 2), (0, 1, 1, 2), (0, 0, 1, 2))
    tight = max(evaluate_assignment(cm, [0, 1, 2, 2]).stage_memory_bytes) - 1
    check_against(cm, tight, brute_force(cm, tight))


@pytest.mark.parametrize("seed", range(12))
def test_chains_with_values_and_ties_equal_the_dp(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 10)
    prof = with_values(rng, make_profile(
        [rng.uniform(0.1, 3) for _ in range(n)], param_bytes=[4 * rng.randint(0, 500)
                                                              for _ in range(n)],
        out_bytes=[float(rng.randint(0, 1000)) for _ in range(n)],
        saved_bytes=[float(rng.randint(0, 1000)) for _ in range(n)], sizes=(1, 2)))
    prof = dataclasses.replace(prof, edges=None, edge_values=None)  # a chain: u -> u+1 reads all
    cm = CostModel(prof, 4, 2, stages=rng.randint(1, min(n, 4)), link=Link(1e-6, 0.5))
    limit = max(partition_chain(cm).stage_memory_bytes) * rng.uniform(0.7, 1.0)
    try:
        expected: float | None = partition_chain(cm, limit).bottleneck_ms
    except InfeasibleError:
        expected = None
    check_against(cm, limit, expected)
