"""Layer graphs: the evaluator against hand-computed figures and, on chains, the cost model."""

import dataclasses
import math
import random

import networkx as nx
import pytest

from partitioner.cost.model import CostModel
from partitioner.cost.partition import evaluate_assignment
from partitioner.formats.assumptions import Link
from partitioner.formats.layers import assignment_problems, layer_edges, stage_of_nodes
from partitioner.formats.profile import OutputValue, load_profile
from tests.synthetic import llama_like, make_profile, random_dag

MB = 10**6


def diamond(recompute: str = "never", stages: int = 3) -> CostModel:
    """0 -> {1, 2} -> 3, a skip 0 -> 3; 1 MB per output, 1 GB/s: 1 ms + 0.5 ms per transfer."""
    prof = make_profile([1.0, 2.0, 3.0, 4.0], param_bytes=[4, 8, 12, 16],
                        out_bytes=[1 * MB, 2 * MB, 3 * MB, 4 * MB], saved_bytes=[10, 20, 30, 40],
                        in_bytes=[7, 1 * MB, 1 * MB, 5 * MB])
    prof = dataclasses.replace(prof, edges=((0, 1), (0, 2), (0, 3), (1, 3), (2, 3)))
    return CostModel(prof, 2, 2, stages=stages, recompute=recompute,  # type: ignore[arg-type]
                     link=Link(1.0, 0.5), optimizer="none")


def test_output_is_sent_once_per_destination_stage() -> None:
    sol = evaluate_assignment(diamond(), [0, 1, 2, 2])
    t0, t1 = 1.5, 2.5  # latency 0.5 ms + MB / (1 GB/s)
    # Layer 0 feeds stage 1 (layer 1) and stage 2 (layers 2 and 3): two sends, not three.
    assert sol.stage_comm_ms == pytest.approx((2 * t0, t0 + t1, t0 + t1))
    assert sol.stage_sent_bytes == (2 * MB, 2 * MB, 0.0)
    assert sol.stage_compute_ms == (3.0, 6.0, 21.0)  # fwd + bwd = 3 x fwd
    assert sol.nodes == ((0,), (1,), (2, 3)) and sol.stage_of == (0, 1, 2, 2)
    assert sol.bottleneck_ms == pytest.approx(21.0 + t0 + t1)
    assert sol.is_ranges  # ranges of the layer order, here
    assert not evaluate_assignment(diamond(), [0, 1, 0, 2]).is_ranges


def test_memory_stashes_outside_inputs_once_per_source() -> None:
    # Recompute everywhere, M=2 in flight (gpipe): stage 2 = layers {2, 3} stashes the outputs
    # of 0 and 1 (0 feeds both of its layers but counts once); stage 0 stashes the model input.
    sol = evaluate_assignment(diamond("always"), [0, 1, 2, 2])
    state = [2 * 4, 2 * 8, 2 * 12, 2 * 16]  # optimizer none, float32: weight + gradient
    assert sol.stage_memory_bytes == pytest.approx((
        state[0] + 2 * 7 + 10,
        state[1] + 2 * MB + 20,
        state[2] + state[3] + 2 * (1 * MB + 2 * MB) + 30 + 40))
    plain = evaluate_assignment(diamond("never"), [0, 1, 2, 2])
    assert plain.stage_memory_bytes == (state[0] + 20, state[1] + 40, state[2] + state[3] + 140)
    assert plain.stage_compute_ms == (3.0, 6.0, 21.0)
    assert sol.stage_compute_ms == (4.0, 8.0, 28.0)  # forward again


@pytest.mark.parametrize("seed", range(40))
def test_chain_equals_the_cost_model(seed: int) -> None:
    """Every schedule, split backward and V stages per rank included."""
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    out = [float(rng.randint(0, 10**6)) for _ in range(n)]
    prof = make_profile([rng.uniform(0, 3) for _ in range(n)],
                        param_bytes=[4 * rng.randint(0, 100) for _ in range(n)],
                        out_bytes=out, saved_bytes=[rng.randint(0, 1000) for _ in range(n)],
                        in_bytes=[float(rng.randint(0, 10**6)), *out[:-1]], sizes=(1, 3))
    k = rng.randint(1, n)
    schedule = rng.choice(["gpipe", "1f1b", "zb-h1"] + ["zbv"] * (k % 2 == 0)
                          + ["interleaved"] * (k > 1))
    per_rank = rng.choice([v for v in range(2, k + 1) if k % v == 0]) \
        if schedule == "interleaved" else 1
    m = rng.randint(1, 4)
    cm = CostModel(prof, m * rng.randint(1, 3), m, stages=k,
                   recompute=rng.choice(["never", "always", "except_last"]),
                   schedule=schedule, link=Link(0.01, 0.2),  # type: ignore[arg-type]
                   stages_per_rank=per_rank)
    cuts = [0, *sorted(rng.sample(range(1, n), k - 1)), n]
    stage_of = [s for s in range(k) for _ in range(cuts[s], cuts[s + 1])]
    sol = evaluate_assignment(cm, stage_of)
    for s in range(k):
        a, b = cuts[s], cuts[s + 1]
        assert sol.stage_ms[s] == pytest.approx(cm.stage_compute_ms(a, b, s)
                                                + cm.stage_comm_ms(a, b))
        assert sol.stage_memory_bytes[s] == pytest.approx(cm.stage_memory_bytes(a, b, s))
    assert sol.is_ranges


def test_assignment_problems_are_all_listed() -> None:
    edges = [(0, 1), (1, 2), (0, 2)]
    assert assignment_problems(3, edges, [0, 0, 1], 2) == []
    problems = assignment_problems(3, edges, [1, 0, 3], 3)
    assert any("outside 0..2" in p for p in problems)
    assert any("stages [2] are empty" in p for p in problems)
    assert any("edge 0 -> 1 goes from stage 1 back to stage 0" in p for p in problems)
    assert assignment_problems(3, edges, [0, 1], 2) == ["2 stage numbers given for 3 layers; "
                                                        "give one each"]
    with pytest.raises(ValueError, match="not a convex partition"):
        evaluate_assignment(diamond(stages=2), [1, 0, 1, 1])


def test_stage_of_nodes_refuses_overlaps() -> None:
    assert stage_of_nodes([(1,), (0, 2)]) == (1, 0, 1)
    with pytest.raises(ValueError, match="listed twice"):
        stage_of_nodes([(0, 1), (1,)])


def test_graph_of_a_real_profile() -> None:
    prof = load_profile("pipedream/inception_v3")
    graph = nx.DiGraph(layer_edges(prof))
    graph.add_nodes_from(range(prof.num_layers))
    assert nx.is_directed_acyclic_graph(graph)
    assert graph.number_of_nodes() == prof.num_layers
    assert graph.number_of_edges() == len(prof.edges or ())
    chain = load_profile("h200/gpt2-medium")
    assert layer_edges(chain) == tuple((i, i + 1) for i in range(chain.num_layers - 1))
    assert math.isfinite(evaluate_assignment(
        CostModel(prof, 4, 4, stages=1), [0] * prof.num_layers).bottleneck_ms)


def llama_cm(recompute: str = "never") -> CostModel:
    """``llama_like`` with one micro-batch of 2, 1 GB/s + 0.5 ms, no optimizer state: every
    transfer of n bytes takes 0.5 + n / 1e6 ms."""
    return CostModel(llama_like(), 2, 1, stages=3, recompute=recompute,  # type: ignore[arg-type]
                     link=Link(1.0, 0.5), optimizer="none")


def t(n_bytes: float) -> float:
    return 0.5 + n_bytes / 1e6


def test_values_cross_once_per_destination_and_only_grad_values_come_back() -> None:
    sol = evaluate_assignment(llama_cm(), [0, 1, 2, 2])
    # stage 0 sends hidden (200 B) to 1, and mask (16 B), cos and sin (8 B) to 1 and to 2
    assert sol.stage_comm_ms == pytest.approx((t(200) + 2 * t(16) + 4 * t(8),
                                               t(200) + t(200),  # hidden's gradient, block0
                                               t(200)))  # block0's gradient; mask: none
    assert sol.stage_sent_bytes == (200 + 2 * (16 + 8 + 8), 200.0, 0.0)
    # the head (stage 2) uses the tied embedding weight owned by layer 0: a copy, 2 x 400 B
    assert sol.stage_memory_bytes == (800 + 8, 800 + 8, 2 * 800 + 16 + 800)
    again = evaluate_assignment(llama_cm("always"), [0, 1, 2, 2])
    assert again.stage_memory_bytes == (800 + 8 + 8, 800 + 232 + 8,  # stash the values received
                                        2 * 800 + 800 + (32 + 200) + 16)
    one = evaluate_assignment(dataclasses.replace(llama_cm(), stages=2), [0, 0, 0, 1])
    assert one.stage_memory_bytes[1] == 800 + 800 + 8  # the copy
    assert evaluate_assignment(dataclasses.replace(llama_cm(), stages=1), [0] * 4) \
        .stage_memory_bytes == (4 * 800 + 4 * 8,)  # the owner's stage holds it once


@pytest.mark.parametrize("seed", range(10))
def test_one_listed_output_read_by_every_edge_costs_as_the_whole_output(seed: int) -> None:
    rng = random.Random(seed)
    prof = random_dag(rng, rng.randint(2, 12))
    listed = dataclasses.replace(
        prof, layers=tuple(dataclasses.replace(lay, outputs=(OutputValue(f"o{i}", lay.out_bytes),))
                           for i, lay in enumerate(prof.layers)),
        edge_values=tuple((0,) for _ in prof.edges or ()))
    n, k = prof.num_layers, rng.randint(1, min(4, prof.num_layers))
    cuts = [0, *sorted(rng.sample(range(1, n), k - 1)), n]
    stage_of = [s for s in range(k) for _ in range(cuts[s], cuts[s + 1])]
    for rc in ("never", "always"):
        a, b = (CostModel(p, 4, 2, stages=k, recompute=rc, link=Link(0.01, 0.2))  # type: ignore[arg-type]
                for p in (prof, listed))
        assert evaluate_assignment(a, stage_of) == evaluate_assignment(b, stage_of)


@pytest.mark.parametrize("seed", range(30))
def test_the_partitioners_cost_split_schedules_as_the_cost_model(seed: int) -> None:
    """The chain DP (and the CP-SAT model's data) read the split backward and the rebuilt
    count from the cost model: under a memory limit the DP's best equals brute force over
    ``stage_costs``, which is ``CostModel``'s closed form."""
    import itertools

    from partitioner.cost.partition import stage_costs
    from partitioner.solve.chain import partition_chain
    from partitioner.solve.infeasible import InfeasibleError

    rng = random.Random(seed)
    n = rng.randint(2, 8)
    k = rng.choice([s for s in range(2, n + 1) if s % 2 == 0] or [2])
    prof = make_profile([rng.uniform(0.1, 3) for _ in range(n)],
                        [rng.uniform(0.1, 6) for _ in range(n)],
                        param_bytes=[4 * rng.randint(0, 100) for _ in range(n)],
                        saved_bytes=[rng.randint(0, 1000) for _ in range(n)],
                        in_bytes=[float(rng.randint(0, 300)) for _ in range(n)])
    schedule = rng.choice(["zb-h1", "zbv"])
    cm = CostModel(prof, 6, 6, stages=k, schedule=schedule,  # type: ignore[arg-type]
                   recompute=rng.choice(["always", "except_last", "never"]))  # type: ignore[arg-type]
    options = [stage_costs(cm, (0, *inner, n))
               for inner in itertools.combinations(range(1, n), k - 1)]
    limit = rng.choice(options).stage_memory_bytes
    cap = max(limit) * rng.uniform(0.8, 1.1)
    fitting = [s.bottleneck_ms for s in options if max(s.stage_memory_bytes) <= cap]
    try:
        got = partition_chain(cm, cap).bottleneck_ms
    except InfeasibleError:
        assert not fitting
    else:
        assert got == pytest.approx(min(fitting), rel=1e-8)
