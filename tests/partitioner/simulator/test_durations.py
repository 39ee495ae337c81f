"""The simulator on graph plans (stages as convex node sets): the evaluator's per-stage time and
memory, the chain as a special case, the closed forms, and skip data never making a stage wait."""

import dataclasses
import itertools
import math
import random

import numpy as np
import pytest

from partitioner.cost.model import CostModel
from partitioner.cost.partition import evaluate_assignment, stage_costs
from partitioner.formats.assumptions import Link
from partitioner.formats.profile import OutputValue, Profile
from partitioner.simulator.durations import cross_transfers
from partitioner.simulator.engine import simulate
from tests.synthetic import chain_with_values, make_profile, random_dag, with_values

LINKS = [Link(math.inf, 0.0), Link(1e-6, 0.0), Link(2e-6, 0.5)]


def convex_assignment(rng: random.Random, prof: Profile, big_k: int) -> list[int]:
    """K non-empty stages: consecutive chunks of a random topological order (so convex, and
    seldom layer ranges)."""
    n, edges = prof.num_layers, prof.edges or ()
    preds = {v: {u for u, w in edges if w == v} for v in range(n)}
    order: list[int] = []
    while len(order) < n:
        ready = [v for v in range(n) if v not in order and preds[v] <= set(order)]
        order.append(rng.choice(ready))
    cuts = sorted(rng.sample(range(1, n), big_k - 1))
    stage_of = [0] * n
    for k, (a, b) in enumerate(itertools.pairwise([0, *cuts, n])):
        for v in order[a:b]:
            stage_of[v] = k
    return stage_of


def instances(count: int, seed: int = 0,
              values: bool = False) -> list[tuple[CostModel, list[int]]]:
    """Random DAGs and convex assignments; ``values``: with listed outputs, edges that read
    some of them (or nothing) and tied parameters (``synthetic.with_values``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(2, 9)
        big_k = rng.randint(1, min(n, 4))
        m = rng.randint(1, 6)
        prof = random_dag(rng, n)
        if values:
            prof = with_values(rng, prof)
        cm = CostModel(prof, m * rng.randint(1, 2), m, stages=big_k,
                       recompute=rng.choice(["never", "always", "except_last"]),  # type: ignore[arg-type]
                       schedule=rng.choice(["gpipe", "1f1b"]),  # type: ignore[arg-type]
                       link=rng.choice(LINKS), optimizer=rng.choice(["none", "adam"]))  # type: ignore[arg-type]
        out.append((cm, convex_assignment(rng, prof, big_k)))
    return out


def nodes_of(stage_of: list[int], big_k: int) -> list[list[int]]:
    return [[i for i, s in enumerate(stage_of) if s == k] for k in range(big_k)]


@pytest.mark.parametrize("values", [False, True])
def test_busy_plus_send_is_m_times_the_evaluators_stage_time(values: bool) -> None:
    """Even micro-batches (all of size b), one device per stage: every stage is occupied
    exactly M x (compute + communication) as the evaluator (the ILP's cost) counts it."""
    skipping = 0
    for cm, stage_of in instances(150, values=values):
        sol = evaluate_assignment(cm, stage_of)
        res = simulate(cm, nodes=nodes_of(stage_of, cm.stages))
        m = cm.microbatches
        assert res.stage_busy_ms == pytest.approx([m * c for c in sol.stage_compute_ms])
        assert res.stage_comm_ms == pytest.approx([m * c for c in sol.stage_comm_ms])
        _, src, dst, _ = cross_transfers(cm, np.asarray(stage_of))
        skipping += int(((dst - src) > 1).sum())
    assert skipping > 20  # the instances do send data past stages


@pytest.mark.parametrize("values", [False, True])
def test_memory_peaks_equal_the_evaluators(values: bool) -> None:
    for cm, stage_of in instances(150, seed=1, values=values):
        sol = evaluate_assignment(cm, stage_of)
        res = simulate(cm, nodes=nodes_of(stage_of, cm.stages))
        assert res.stage_peak_bytes == pytest.approx(sol.stage_memory_bytes, rel=1e-12)


def test_split_memory_peaks_equal_the_evaluators() -> None:
    """ZB-H1 on random DAGs whose layers say what W keeps (``held_for_w_bytes``, summed over
    a stage's layers from I to W) or not (the graph held until W): the replay's peaks are the
    evaluator's closed form over the schedule's states."""
    rng = random.Random(7)
    kept = 0
    for cm, stage_of in instances(150, seed=2):
        if rng.random() < 0.7:
            kept += 1
            cm = dataclasses.replace(cm, profile=dataclasses.replace(cm.profile, layers=tuple(
                dataclasses.replace(lay, held_for_w_bytes=(w := tuple(
                    rng.choice([0.0, 0.5, 3.0]) * (s + 1.0) for s in lay.saved_bytes)),
                    held_for_w_input_bytes=tuple(0.0 for _ in w))
                for lay in cm.profile.layers)))
        cm = dataclasses.replace(cm, schedule="zb-h1")
        sol = evaluate_assignment(cm, stage_of)
        res = simulate(cm, nodes=nodes_of(stage_of, cm.stages))
        assert res.stage_peak_bytes == pytest.approx(sol.stage_memory_bytes, rel=1e-12)
    assert kept > 50


@pytest.mark.parametrize("seed", range(6))
def test_a_graph_plan_of_ranges_simulates_as_the_chain_plan(seed: int) -> None:
    """The chain i -> i+1 given as edges, stages given as node sets that happen to be ranges:
    the same timeline as the chain profile's ranges (uneven micro-batches, links, recompute,
    shared devices and the optimizer step included)."""
    rng = random.Random(seed)
    n, big_k = 8, rng.randint(1, 4)
    out = [float(rng.randint(0, 1000)) for _ in range(n)]
    chain = make_profile([rng.uniform(0.1, 3.0) for _ in range(n)],
                         [rng.uniform(0.1, 6.0) for _ in range(n)],
                         param_bytes=[4 * rng.randint(0, 500) for _ in range(n)],
                         out_bytes=out, saved_bytes=[float(rng.randint(0, 999)) for _ in range(n)],
                         in_bytes=[7.0, *out[:-1]], sizes=(1, 2))
    graph = dataclasses.replace(chain, edges=tuple((i, i + 1) for i in range(n - 1)))
    cuts = [0, *sorted(rng.sample(range(1, n), big_k - 1)), n]
    ranges = list(itertools.pairwise(cuts))
    devices = sorted(rng.randint(0, big_k - 1) for _ in range(big_k))
    def run(prof: Profile, rc: str, sched: str, link: Link,
            **stages: object) -> tuple[object, ...]:
        cm = CostModel(prof, 11, 4, stages=big_k, recompute=rc,  # type: ignore[arg-type]
                       schedule=sched, link=link)  # type: ignore[arg-type]
        res = simulate(cm, devices=devices, optimizer_ms=2.5, **stages)  # type: ignore[arg-type]
        assert res.timeline is not None
        return (res.step_ms, res.bubble_fraction, res.stage_busy_ms, res.stage_comm_ms,
                res.stage_peak_bytes, res.timeline.events)

    for config in itertools.product(["never", "always", "except_last"], ["gpipe", "1f1b"],
                                    LINKS):
        expected = run(chain, *config, ranges=ranges)
        assert run(graph, *config, nodes=[range(a, b) for a, b in ranges]) == expected
        assert run(graph, *config, ranges=ranges) == expected


def _balanced_dag(big_k: int, fwd_ms: float, bwd_ms: float) -> Profile:
    """Three layers per stage (a -> b, a -> c), with skips from every stage's a to the c two
    and three stages on, and from b to the next stage's b: stages are balanced however much
    crosses them."""
    n = 3 * big_k
    prof = make_profile([fwd_ms / 4, fwd_ms / 2, fwd_ms / 4] * big_k,
                        [bwd_ms / 2, bwd_ms / 4, bwd_ms / 4] * big_k,
                        out_bytes=[100.0] * n, saved_bytes=[10.0] * n)
    edges = set()
    for k in range(big_k):
        a = 3 * k
        edges |= {(a, a + 1), (a, a + 2)}
        if k + 1 < big_k:
            edges |= {(a + 2, a + 3), (a + 1, a + 4)}
        edges |= {(a, 3 * j + 2) for j in (k + 2, k + 3) if j < big_k}
    return dataclasses.replace(prof, edges=tuple(sorted(edges)))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("big_k,m", [(1, 3), (3, 1), (4, 8), (5, 3), (6, 17)])
def test_balanced_graph_stages_keep_the_closed_forms(schedule: str, big_k: int, m: int) -> None:
    fwd_ms, bwd_ms = 1.25, 2.0
    cm = CostModel(_balanced_dag(big_k, fwd_ms, bwd_ms), m, m, stages=big_k,
                   schedule=schedule)  # type: ignore[arg-type]
    res = simulate(cm, nodes=[range(3 * k, 3 * k + 3) for k in range(big_k)])
    assert res.step_ms == pytest.approx((m + big_k - 1) * (fwd_ms + bwd_ms))
    assert res.bubble_fraction == pytest.approx((big_k - 1) / (m + big_k - 1))
    held = [m if schedule == "gpipe" else min(big_k - k, m) for k in range(big_k)]
    assert res.stage_peak_bytes == pytest.approx([30.0 * h for h in held])


def test_skipped_data_has_arrived_before_it_is_needed() -> None:
    """Every transfer u -> stage d (also past stages) ends before F(d, i) starts, and its
    gradient is back before the sender's B(., i): the schedule's waits cover them."""
    checked = 0
    for cm, stage_of in instances(120, seed=2):
        res = simulate(cm, nodes=nodes_of(stage_of, cm.stages))
        assert res.timeline is not None
        end = {(e.action.kind, e.action.stage, e.action.microbatch): e for e in
               res.timeline.events}
        _, src, dst, _ = cross_transfers(cm, np.asarray(stage_of))
        for j, d in zip(src.tolist(), dst.tolist(), strict=True):
            for i in range(cm.microbatches):
                sent = end.get(("SF", j, i), end[("F", j, i)]).end_ms
                assert end[("F", d, i)].start_ms >= sent - 1e-9
                grad = end.get(("SB", d, i), end[("B", d, i)]).end_ms
                assert end[("B", j, i)].start_ms >= grad - 1e-9
                checked += d - j > 1
    assert checked > 50


def test_bad_node_sets_are_refused_with_every_problem() -> None:
    cm = CostModel(_balanced_dag(3, 1.0, 2.0), 4, 2, stages=3)
    with pytest.raises(ValueError, match=r"edge 0 -> 1 goes from stage 1 back to stage 0"):
        simulate(cm, nodes=[[1, 2, 3], [0, 4, 5], [6, 7, 8]])
    with pytest.raises(ValueError, match=r"layer 3 of stage 1 .* listed twice"):
        simulate(cm, nodes=[[0, 1, 2, 3], [3, 4, 5], [6, 7, 8]])
    with pytest.raises(ValueError, match=r"2 node sets given .*K=3.*\n.*1 devices given"):
        simulate(cm, nodes=[range(4), range(4, 9)], devices=[0])
    with pytest.raises(ValueError, match="either as layer ranges or as nodes=, not both"):
        simulate(cm, [(0, 3), (3, 6), (6, 9)], nodes=[range(3), range(3, 6), range(6, 9)])


@pytest.mark.parametrize("grad", [True, False])
def test_free_compute_and_one_skip_value_take_the_transfers_alone(grad: bool) -> None:
    """0 -> 1 -> 2 with layer 0's second output s skipping to 2, one layer per stage, M = 1,
    no compute: the step is the forward transfers (a and s, then w) and the gradients back
    (w, s if it has one, then a), each 0.5 ms + bytes / (1 GB/s)."""
    outs = (OutputValue("a", (1e6,)), OutputValue("s", (3e6,), grad))
    prof = make_profile([0.0] * 3, [0.0] * 3, out_bytes=[0.0, 2e6, 5e6])
    prof = dataclasses.replace(
        prof, layers=(dataclasses.replace(prof.layers[0], outputs=outs), *prof.layers[1:]),
        edges=((0, 1), (0, 2), (1, 2)), edge_values=((0,), (1,), None))
    cm = CostModel(prof, 1, 1, stages=3, link=Link(1.0, 0.5))
    res = simulate(cm, nodes=[[0], [1], [2]])
    t_a, t_s, t_w = 1.5, 3.5, 2.5
    assert res.step_ms == pytest.approx(2 * t_a + t_s + 2 * t_w + (t_s if grad else 0.0))
    assert res.stage_comm_ms == pytest.approx((t_a + t_s, t_w + t_a,
                                               t_w + (t_s if grad else 0.0)))
    assert res.stage_comm_ms == pytest.approx(evaluate_assignment(cm, [0, 1, 2]).stage_comm_ms)


@pytest.mark.parametrize("seed", range(40))
def test_a_chain_with_values_and_ties_simulates_as_the_chain_cost_model(seed: int) -> None:
    """Layers of a chain profile that list several outputs send each (and gradients only of
    those with grad); tied copies add to the state: the simulator's sends and peaks are
    ``stage_costs``'s (the DP's figures)."""
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    prof = chain_with_values(rng, make_profile(
        [rng.uniform(0.1, 3) for _ in range(n)],
        param_bytes=[4 * rng.randint(0, 500) for _ in range(n)],
        out_bytes=[float(rng.randint(0, 1000)) for _ in range(n)],
        saved_bytes=[float(rng.randint(0, 1000)) for _ in range(n)], sizes=(1, 2)))
    k, m = rng.randint(1, min(n, 4)), rng.randint(1, 5)
    cm = CostModel(prof, m, m, stages=k, recompute=rng.choice(["never", "always"]),  # type: ignore[arg-type]
                   link=Link(1e-6, 0.5))
    cuts = [0, *sorted(rng.sample(range(1, n), k - 1)), n]
    sol = stage_costs(cm, cuts)
    res = simulate(cm, [(cuts[i], cuts[i + 1]) for i in range(k)])
    assert res.stage_comm_ms == pytest.approx([m * c for c in sol.stage_comm_ms])
    assert res.stage_peak_bytes == pytest.approx(sol.stage_memory_bytes)
