"""The chain partitioner against brute force, its oracle, on random small instances."""

import itertools
import math
import random
import time
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.cost.model import CostModel
from partitioner.cost.partition import evaluate_assignment, stage_costs
from partitioner.formats.assumptions import Link, Runtime
from partitioner.formats.profile import load_profile
from partitioner.solve import chain
from partitioner.solve.chain import partition_chain
from partitioner.solve.infeasible import InfeasibleError
from tests.synthetic import chain_with_values, make_profile, with_saved_parts


def brute_force(cm: CostModel, limit: float) -> float | None:
    """Smallest bottleneck over every composition of L layers into K non-empty stages."""
    n, k = cm.profile.num_layers, cm.stages
    best = None
    for inner in itertools.combinations(range(1, n), k - 1):
        sol = stage_costs(cm, (0, *inner, n))
        fits = max(sol.stage_memory_bytes) <= limit * (1 + 1e-9)
        if fits and (best is None or sol.bottleneck_ms < best):
            best = sol.bottleneck_ms
    return best


values = st.floats(0.0, 10.0, allow_nan=False).map(lambda x: round(x, 3))
byte_values = st.integers(0, 1000)


@st.composite
def instances(draw: st.DrawFn, with_values: bool = False,
              exact: bool = False) -> tuple[CostModel, float]:
    n = draw(st.integers(1, 9))
    k = draw(st.integers(1, min(n, 5)))
    fwd = draw(st.lists(values, min_size=n, max_size=n))
    bwd = draw(st.lists(values, min_size=n, max_size=n))
    params = draw(st.lists(st.integers(0, 500).map(lambda x: 4 * x), min_size=n, max_size=n))
    saved = draw(st.lists(byte_values, min_size=n, max_size=n))
    out = draw(st.lists(byte_values, min_size=n, max_size=n))
    ins = draw(st.lists(byte_values, min_size=n, max_size=n))
    prof = make_profile(fwd, bwd, param_bytes=params, out_bytes=out, saved_bytes=saved,
                        in_bytes=ins, sizes=(1, 2))
    if with_values:
        prof = chain_with_values(random.Random(draw(st.integers(0, 2**32))), prof)
    if exact:
        prof = with_saved_parts(prof, random.Random(draw(st.integers(0, 2**32))))
    m = draw(st.integers(1, 6))
    link = draw(st.sampled_from([Link(math.inf, 0.0), Link(1e-6, 0.0), Link(1e-6, 0.5)]))
    cm = CostModel(prof, draw(st.integers(m, 3 * m)), m, stages=k,
                   recompute=draw(st.sampled_from(["never", "always", "except_last"])),
                   schedule=draw(st.sampled_from(["gpipe", "1f1b", "zb-h1"] if exact
                                                 else ["gpipe", "1f1b"])), link=link,
                   optimizer=draw(st.sampled_from(["none", "sgd", "adam"])),
                   runtime=draw(st.sampled_from([Runtime(), Runtime(1.4, 0.3)])))
    limit_kind = draw(st.sampled_from(["none", "tight", "random"]))
    if limit_kind == "none":
        limit = math.inf
    else:
        # around the memory of some random partition, so both outcomes occur
        inner = sorted(draw(st.permutations(range(1, n)))[: k - 1])
        mem = max(stage_costs(cm, (0, *inner, n)).stage_memory_bytes)
        limit = mem if limit_kind == "tight" else mem * draw(st.floats(0.3, 1.2))
    return cm, limit


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_equals_brute_force(case: tuple[CostModel, float]) -> None:
    check_brute_force(case)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(with_values=True))
def test_values_and_ties_equal_brute_force(case: tuple[CostModel, float]) -> None:
    """Tied copies join a stage's memory (the DP's ends stay an interval); values cross a cut
    one transfer each, their gradients only when they have one."""
    check_brute_force(case)
    cm, _ = case
    cuts = [0, *range(1, cm.stages), cm.profile.num_layers]
    stage_of = [k for k in range(cm.stages) for _ in range(cuts[k], cuts[k + 1])]
    ranges, graph = stage_costs(cm, cuts), evaluate_assignment(cm, stage_of)
    assert ranges.stage_ms == pytest.approx(graph.stage_ms, rel=1e-12)
    if cm.recompute == "never":  # (recompute: the chain stashes in_bytes, the graph values)
        assert ranges.stage_memory_bytes == pytest.approx(graph.stage_memory_bytes, rel=1e-12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(exact=True))
def test_exact_activation_terms_equal_brute_force(case: tuple[CostModel, float]) -> None:
    """A profile that says what its layers share: per-start terms and the batch on the first
    stage (``cost.activations``), still exact."""
    assert case[0].activations().exact
    check_brute_force(case)


def check_brute_force(case: tuple[CostModel, float]) -> None:
    """Both exact methods, the dense recurrence (small chains) and the bisection (large ones),
    each forced here, against brute force."""
    cm, limit = case
    expected = brute_force(cm, limit)
    for dense_max in (0, 10**12):  # the bisection; the dense recurrence
        with mock.patch.object(chain, "_DENSE_MAX", dense_max):
            if expected is None:
                with pytest.raises(InfeasibleError, match="smallest limit that fits"):
                    partition_chain(cm, limit)
                continue
            sol = partition_chain(cm, limit)
        assert sol.bottleneck_ms == pytest.approx(expected, rel=1e-9, abs=1e-12), dense_max
        assert max(sol.stage_memory_bytes) <= limit * (1 + 1e-9)
        assert sol.boundaries[0] == 0 and sol.boundaries[-1] == cm.profile.num_layers
        assert all(a < b for a, b in itertools.pairwise(sol.boundaries))


def test_balanced_chain_is_split_evenly() -> None:
    cm = CostModel(make_profile([1.0] * 12), 4, 4, stages=4)
    sol = partition_chain(cm)
    assert sol.boundaries == (0, 3, 6, 9, 12)
    assert sol.bottleneck_ms == 9.0


def test_memory_limit_moves_the_cut() -> None:
    # Without a limit the heavy-parameter layer 0 would share a stage; with one, it stands alone.
    prof = make_profile([1.0, 1.0, 1.0, 1.0], param_bytes=[4000, 4, 4, 4], dtype="float32")
    free = partition_chain(CostModel(prof, 1, 1, stages=2, optimizer="none"))
    assert free.boundaries == (0, 2, 4)
    tight = partition_chain(CostModel(prof, 1, 1, stages=2, optimizer="none"), 8005)
    assert tight.boundaries == (0, 1, 4)


def test_infeasible_message_says_what_fits() -> None:
    cm = CostModel(load_profile("h200/gpt-1.3b"), 16, 4, stages=2, recompute="never")
    with pytest.raises(InfeasibleError) as info:
        partition_chain(cm, 8 * 2**30)
    msg = str(info.value)
    assert "8.00 GiB" in msg and "smallest limit that fits at K=2" in msg
    assert "--stages" in msg and "--recompute always" in msg
    with pytest.raises(InfeasibleError, match="K=30 stages need at least 30 layers"):
        partition_chain(CostModel(load_profile("h200/gpt-1.3b"), 16, 4, stages=30))


def test_large_instances_stay_fast() -> None:
    """A smoke bound (the measured figures live in tools/bench_partition.py)."""
    import random

    n = 2000
    prof = make_profile([random.uniform(0.1, 2.0) for _ in range(n)],
                        param_bytes=[4 * random.randint(1, 10**6) for _ in range(n)],
                        saved_bytes=[random.randint(1, 10**6) for _ in range(n)])
    cm = CostModel(prof, 64, 32, stages=64, recompute="always")
    start = time.perf_counter()
    sol = partition_chain(cm, 3e8)
    assert time.perf_counter() - start < 20
    assert len(sol.boundaries) == 65 and max(sol.stage_memory_bytes) <= 3e8


def test_configurations_sharing_their_arrays_solve_as_fresh_ones() -> None:
    """``like`` shares the activation terms, and with them the remembered furthest ends of the
    stage variants (``chain._MEMOS``): every configuration of a search-like sweep, solved
    after the others, gets the partition (or the infeasibility) a fresh cost model gets."""
    prof = load_profile("h200/gpt2-medium")
    base = CostModel(prof, 32, 1)
    mem = [max(partition_chain(base.like(stages=k, microbatches=8, schedule="1f1b"))
               .stage_memory_bytes) for k in (4, 8)]
    outcomes = set()
    for k, m, sched, rc, d, shard, limit in itertools.product(
            (2, 4, 8), (2, 8), ("gpipe", "1f1b", "zb-h1", "interleaved"), ("never", "always"),
            (1, 2), (False, True), (mem[0], mem[1], 0.8 * mem[1])):
        if sched == "interleaved" and k % 2:
            continue
        args = dict(stages=k, microbatches=m, schedule=sched, recompute=rc, replicas=d,
                    shard_optimizer=shard, stages_per_rank=2 if sched == "interleaved" else 1)
        shared, fresh = base.like(**args), CostModel(prof, 32, **args)  # type: ignore[arg-type]
        got = []
        for cm in (shared, fresh):
            try:
                got.append(partition_chain(cm, limit, explain=False).boundaries)
            except InfeasibleError:
                got.append(None)
        assert got[0] == got[1], args
        outcomes.add(got[0] is None)
    assert outcomes == {True, False}  # both feasible and infeasible configurations were met
    assert any(memo for _, memo in chain._MEMOS.values())
