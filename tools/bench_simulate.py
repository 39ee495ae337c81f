"""Benchmark of the simulator and the search: a K=64, M=512 step (goal: under 1 s), a search
over >= 500 configurations (goal: under 10 s), against baselines timed in the same run, and
searches on graph profiles with the CP-SAT partitioner against splits of the layer order, and
searches over data-parallel replicas on a topology (gpt-1.3b, 8 nodes x 8, B=512 and B=2048,
the latter 10,707 configurations: goal 10,000 configurations in 10 s), pruned (``keep``, best
first) against every configuration simulated in the same run.

    python tools/bench_simulate.py            # full sizes
    python tools/bench_simulate.py --quick    # small sizes (used by the test suite)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from partitioner.cost.model import CostModel
from partitioner.formats.assumptions import LINKS
from partitioner.formats.plan_schedule import PLAN_SCHEDULES
from partitioner.formats.profile import DeviceInfo, LayerProfile, Profile, load_profile
from partitioner.formats.topology import Topology
from partitioner.schedule.generators import make_schedule
from partitioner.schedule.ir import Schedule
from partitioner.simulator.engine import ranges_from_boundaries, simulate
from partitioner.solve.chain import partition_chain
from partitioner.solve.search import search


def _best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Smallest wall time of ``repeats`` runs (the machine is shared: the minimum is the
    least disturbed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _chain(num_layers: int) -> Profile:
    """Identical layers, so the closed forms hold and can be checked: F = 1, B = 2, and split
    I = W = 1 ms at b = 1."""
    layers = tuple(LayerProfile(str(i), "Block", 4 * 10**6, (1.0, 1.9), (2.0, 3.8),
                                (2e6, 4e6), (2e6, 4e6), (3e7, 6e7), bwd_input_ms=(1.0, 1.9),
                                bwd_weight_ms=(1.0, 1.9)) for i in range(num_layers))
    return Profile("bench-chain", DeviceInfo("synthetic", "cuda", 80 * 2**30), "bfloat16",
                   (1, 2), layers)


def simulation(big_k: int, m: int, repeats: int) -> None:
    print(f"== one step, K={big_k} stages, M={m} micro-batches ({2 * big_k * m} compute "
          f"actions, {3 * big_k * m} with a split backward) ==")
    print(f"{'schedule':>11} {'link':>7} {'timeline':>8} {'simulate_s':>10} {'generate_s':>10} "
          f"{'ratio':>6} {'us/action':>9} {'step_ms':>10} {'closed_form':>11}")
    prof = _chain(2 * big_k)
    ranges = [(2 * k, 2 * k + 2) for k in range(big_k)]
    u, ranks = 2.0, big_k // 2  # a stage's F (= I = W), and R for the schedules with V = 2
    closed_forms = {  # free links, equal stages (2 layers: f + b = 3u), R = K or K / 2
        "gpipe": (m + big_k - 1) * 3 * u, "1f1b": (m + big_k - 1) * 3 * u,
        "interleaved": m * 6 * u + (ranks - 1) * 3 * u,  # M t + (R-1) t / V, t = 2 (f + b)
        "zb-h1": 3 * m * u + (big_k - 1) * u, "zbv": 6 * m * u + (ranks - 1) * u}
    for sched, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("zbv", 2)):
        started = time.perf_counter()
        schedule = make_schedule(sched, big_k, m, v)
        generate_s = time.perf_counter() - started
        if sched != "zbv" and repeats > 1:  # zbv's list scheduler takes seconds at K=64
            generate_s = min(generate_s, _best_of(
                repeats - 1, lambda sched=sched, v=v: make_schedule(sched, big_k, m, v)))
        for link in ("free", "nvlink"):
            cm = CostModel(prof, m, m, stages=big_k, schedule=sched,  # type: ignore[arg-type]
                           link=LINKS[link], stages_per_rank=v)
            for record in (True, False):
                def run(cm: CostModel = cm, record: bool = record,
                        schedule: Schedule = schedule) -> object:
                    return simulate(cm, ranges, schedule, record=record)
                sim_s = _best_of(repeats, run)
                step = simulate(cm, ranges, schedule, record=False).step_ms
                actions = sum(map(len, schedule.actions))
                print(f"{sched:>11} {link:>7} {record!s:>8} {sim_s:>10.3f} {generate_s:>10.3f} "
                      f"{sim_s / generate_s:>6.1f} {1e6 * sim_s / actions:>9.2f} "
                      f"{step:>10.1f} {closed_forms[sched]:>11.1f}")
    print("(ratio: simulating / generating the same schedule; the closed forms (GPipe, 1F1B: "
          "(M+K-1)(f+b); interleaved, R = K/2, V = 2: M t + (R-1) t/V; ZB-H1: 3Mu + (K-1)u; "
          "ZB-V, R = K/2: 6Mu + (R-1)u) hold for the free link)\n")


def search_speed(quick: bool) -> None:
    print("== search over K, M, recompute and schedule (exact partition + simulation each) ==")
    print(f"{'profile':>16} {'B':>4} {'N':>3} {'configs':>7} {'search_s':>8} "
          f"{'ms/config':>9} {'dp_only_ms':>10} {'best':>28}")
    cases = [("h200/gpt2-medium", 16, 4)] if quick else [
        ("h200/gpt2-medium", 16, 8), ("h200/gpt-1.3b", 32, 8), ("h200/resnet50", 256, 8)]
    for name, batch, devices in cases:
        prof = load_profile(name)
        limit = float(prof.device.memory_bytes or 0) or float("inf")
        started = time.perf_counter()
        res = search(prof, devices, batch, limit, link=LINKS["nvlink"])
        total = time.perf_counter() - started
        # baseline: one exact partition per configuration, no caching, no simulation
        sample = [CostModel(prof, batch, m, stages=k, link=LINKS["nvlink"])
                  for k in range(1, devices + 1) for m in (1, 2, 4)]
        dp_ms = 1e3 * statistics.median(
            _best_of(1, lambda cm=cm, limit=limit: partition_chain(cm, limit)) for cm in sample)
        b = res.best
        best = f"K={b.stages} M={b.microbatches} {b.schedule} {b.recompute}"
        print(f"{name:>16} {batch:>4} {devices:>3} {res.tried:>7} {total:>8.2f} "
              f"{1e3 * total / res.tried:>9.2f} {dp_ms:>10.2f} {best:>28}")
    print("(dp_only_ms: one uncached exact partition, median; the search solves the partition "
          "once per (K, b, recompute) and again only where the memory limit binds)")


def graph_search(quick: bool) -> None:
    print("\n== search on PipeDream graph profiles: CP-SAT partitions vs splits of the layer "
          "order (NVLink, 10 s per ILP solve, M in 1,2,4,8; proven: optimal/fitting) ==")
    print(f"{'profile':>22} {'B':>3} {'N':>3} {'solver':>6} {'configs':>7} {'solves':>6} "
          f"{'proven':>7} {'search_s':>8} {'step_ms':>9} {'best':>28}")
    # every schedule on 4 devices; on 8, GPipe and 1F1B only (K <= 8): with every schedule
    # the interleaved and V-shaped stages (K = 16, 32) make CP-SAT solves of minutes each
    every = tuple(PLAN_SCHEDULES)
    cases = [("pipedream/resnet18", 4, 2, every)] if quick else [
        ("pipedream/resnet50", 8, 4, every), ("pipedream/resnet50", 8, 8, ("gpipe", "1f1b"))]
    for name, batch, devices, schedules in cases:
        prof = load_profile(name)
        limit = float(prof.device.memory_bytes or 0) or float("inf")
        steps = {}
        for solver in ("ilp", "dp"):
            res = search(prof, devices, batch, limit, schedules=schedules,
                         link=LINKS["nvlink"], solver=solver,
                         microbatches=[m for m in (1, 2, 4, 8) if m <= batch])
            b = res.best
            proven = sum(getattr(c.solution, "status", "") == "optimal" for c in res.candidates)
            steps[solver] = b.step_ms
            print(f"{name:>22} {batch:>3} {devices:>3} {solver:>6} {res.tried:>7} "
                  f"{res.solves:>6} "
                  f"{f'{proven}/{len(res.candidates)}' if solver == 'ilp' else '-':>7} "
                  f"{res.seconds:>8.2f} {b.step_ms:>9.2f} "
                  f"{f'K={b.stages} M={b.microbatches} {b.schedule} {b.recompute}':>28}")
        print(f"{'':>22} the graph partition's best step {100 * (steps['dp'] / steps['ilp'] - 1):.2f}"
              f"% faster than the best split of the layer order (schedules: "
              f"{'every' if schedules == every else ', '.join(schedules)})")


def replica_search(quick: bool) -> None:
    print("\n== search over K, D (both layouts), M, recompute and every schedule on a "
          "topology (nvlink in a node, ib between), pruned to the top 10 (keep=10) ==")
    print(f"{'profile':>16} {'B':>4} {'nodes':>5} {'keep':>5} {'configs':>7} {'skipped':>7} "
          f"{'solves':>6} {'search_s':>8} {'configs/s':>9} {'best':>24}")
    small = ("h200/gpt2-medium", 24, 1, 4)
    cases = [(*small, True)] if quick else [(*small, True), ("h200/gpt-1.3b", 64, 1, 8, True),
                                            ("h200/gpt-1.3b", 512, 8, 8, True),
                                            ("h200/gpt-1.3b", 2048, 8, 8, False)]
    # (B=2048 unpruned: 647 s here, so its same-run baseline is the B=512 one above it)
    for name, batch, nodes, per_node, compare in cases:
        prof = load_profile(name)
        topo = Topology(nodes, per_node, LINKS["nvlink"], LINKS["ib"])
        limit = float(prof.device.memory_bytes or 0) or float("inf")
        runs = {}
        for keep in ((10, None) if compare else (10,)):
            runs[keep] = res = search(prof, 0, batch, limit, link=LINKS["nvlink"],
                                      topology=topo, keep=keep)
            b = res.best
            print(f"{name:>16} {batch:>4} {nodes:>5} {keep or 'all':>5} {res.tried:>7} "
                  f"{res.skipped:>7} {res.solves:>6} {res.seconds:>8.2f} "
                  f"{res.tried / res.seconds:>9.0f} "
                  f"{f'K={b.stages} D={b.replicas} M={b.microbatches} {b.schedule}':>24}")
        pruned = runs[10]
        if pruned.tried >= 10_000:
            print(f"{'':>16} goal, 10,000 configurations in under 10 s: {pruned.tried:,} in "
                  f"{pruned.seconds:.2f} s, {'met' if pruned.seconds < 10.0 else 'NOT met'}")
        if compare:
            full = runs[None]
            same = ([c.step_ms for c in pruned.candidates[:10]]
                    == [c.step_ms for c in full.candidates[:10]])
            print(f"{'':>16} pruned {full.seconds / pruned.seconds:.1f}x faster than every "
                  f"configuration simulated; the top 10 identical: {same}")


def sanity(big_k: int, m: int) -> None:
    """The benchmark's step is the closed form: fail loudly rather than time a wrong answer."""
    prof = _chain(big_k)
    cm = CostModel(prof, m, m, stages=big_k)
    step = simulate(cm, ranges_from_boundaries(list(range(big_k + 1))), record=False).step_ms
    expected = (m + big_k - 1) * 3.0
    if abs(step - expected) > 1e-6 * expected:
        raise SystemExit(f"simulated step {step} != closed form {expected}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    args = p.parse_args()
    big_k, m = (8, 32) if args.quick else (64, 512)
    sanity(big_k, m)
    simulation(big_k, m, repeats=1 if args.quick else 3)
    search_speed(args.quick)
    graph_search(args.quick)
    replica_search(args.quick)


if __name__ == "__main__":
    main()
