"""Benchmark of the CP-SAT graph partitioner: a 200-layer DAG, a 1,000-layer chain against the
DP, and PipeDream's real graph profiles against the best chain split of their layer order.

    python tools/bench_ilp.py                  # all sections (a few minutes on 2 cores)
    python tools/bench_ilp.py --quick          # small sizes, short limits (used by the tests)
    python tools/bench_ilp.py --case-limit 5   # seconds of CP-SAT per PipeDream case
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path

from bench_partition import synthetic  # the same random chain (tools/ is on the path)

from partitioner.cost.model import CostModel
from partitioner.cost.partition import evaluate_assignment
from partitioner.formats.assumptions import LINKS
from partitioner.formats.profile import DeviceInfo, LayerProfile, Profile, load_profile
from partitioner.solve.chain import partition_chain
from partitioner.solve.ilp import partition_graph

PIPEDREAM = Path(__file__).resolve().parents[1] / "profiles" / "pipedream"


def synthetic_dag(num_layers: int, seed: int) -> Profile:
    """Blocks in sequence: plain layers, residual blocks (a branch of 2-3 layers plus the
    skip), Inception-like blocks (2-4 parallel branches of 1-3 layers, merged), and U-Net
    long skips from early block outputs to the mirrored late ones."""
    rng = random.Random(seed)
    edges: set[tuple[int, int]] = set()
    outputs: list[int] = []
    count, prev = 1, 0  # layer 0 is the stem

    def chain_from(src: int, length: int) -> int:
        nonlocal count
        for _ in range(length):
            edges.add((src, count))
            src, count = count, count + 1
        return src

    while count < num_layers - 8:
        kind = rng.choice(["plain", "residual", "branches"])
        if kind == "plain":
            prev = chain_from(prev, 1)
        else:
            ends = ([chain_from(prev, rng.randint(2, 3)), prev] if kind == "residual"
                    else [chain_from(prev, rng.randint(1, 3)) for _ in range(rng.randint(2, 4))])
            edges.update((e, count) for e in ends)
            prev, count = count, count + 1
        outputs.append(prev)
    prev = chain_from(prev, num_layers - count)
    for j in range(0, len(outputs) // 2, max(1, len(outputs) // 10)):
        if outputs[j] < outputs[-1 - j]:
            edges.add((outputs[j], outputs[-1 - j]))
    layers = []
    for i in range(num_layers):
        fwd = rng.uniform(0.2, 2.0)
        act = float(rng.randint(10**6, 2 * 10**7))
        layers.append(LayerProfile(str(i), "Synthetic", 4 * rng.randint(10**4, 10**6), (fwd,),
                                   (2 * fwd,), (act,), (act,), (act,)))
    return Profile(f"dag-{num_layers}", DeviceInfo("synthetic", "cuda", 80 * 2**30), "float32",
                   (1,), tuple(layers), edges=tuple(sorted(edges)))


def dp_as_graph(cm: CostModel, limit: float) -> tuple[float, bool, float]:
    """The chain DP on the layer order: (its bottleneck under the graph costs, whether it fits
    the graph memory model, its solve seconds)."""
    start = time.perf_counter()
    cuts = partition_chain(cm, limit).boundaries
    took = time.perf_counter() - start
    sol = evaluate_assignment(cm, [k for k in range(cm.stages)
                                   for _ in range(cuts[k], cuts[k + 1])])
    return sol.bottleneck_ms, max(sol.stage_memory_bytes) <= limit * (1 + 1e-9), took


def dag_section(num_layers: int, limit_s: float) -> None:
    print(f"== {num_layers}-layer DAG with skips, K=8, B=M=8 (time limit {limit_s:g} s) ==")
    prof = synthetic_dag(num_layers, seed=1)
    print(f"{len(prof.edges or ())} edges; memory limit: 1.1 x the per-stage average of the "
          f"unconstrained optimum (binding)")
    print(f"{'link':>7} {'recompute':>10} {'limit':>6} {'status':>9} {'solve_s':>8} "
          f"{'gap':>8} {'graph_ms':>9} {'dp_order_ms':>12} {'dp_fits':>8}")
    for link in ("nvlink", "pcie"):
        for recompute in ("never", "always"):
            cm = CostModel(prof, 8, 8, stages=8, recompute=recompute, link=LINKS[link])
            free = partition_graph(cm, time_limit_s=limit_s)
            for label, limit in (("none", math.inf),
                                 ("1.1x", 1.1 * sum(free.stage_memory_bytes) / 8)):
                sol = free if label == "none" else partition_graph(cm, limit,
                                                                   time_limit_s=limit_s)
                dp_ms, fits, _ = dp_as_graph(cm, limit)
                print(f"{link:>7} {recompute:>10} {label:>6} {sol.status:>9} {sol.solve_s:>8.2f} "
                      f"{100 * sol.gap:>7.3f}% {sol.bottleneck_ms:>9.3f} {dp_ms:>12.3f} "
                      f"{'yes' if fits else 'NO':>8}")


def chain_section(num_layers: int, limit_s: float) -> None:
    print(f"\n== {num_layers}-layer chain, K=8, B=M=32, NVLink: ILP against the DP ==")
    prof = synthetic(num_layers, seed=5)
    print(f"{'recompute':>10} {'limit':>6} {'status':>9} {'ilp_s':>7} {'dp_s':>7} "
          f"{'ilp_ms':>11} {'dp_ms':>11} {'ilp/dp-1':>10} {'rounding':>9}")
    for recompute in ("never", "always"):
        cm = CostModel(prof, 32, 32, stages=8, recompute=recompute, link=LINKS["nvlink"])
        total = cm.param_state_bytes().sum() + 32 * cm.layer_array("saved_bytes").sum()
        for label, limit in (("none", math.inf), ("1.2x", 1.2 * total / 8)):
            start = time.perf_counter()
            dp = partition_chain(cm, limit)
            dp_s = time.perf_counter() - start
            sol = partition_graph(cm, limit, time_limit_s=limit_s)
            print(f"{recompute:>10} {label:>6} {sol.status:>9} {sol.solve_s:>7.2f} {dp_s:>7.3f} "
                  f"{sol.bottleneck_ms:>11.4f} {dp.bottleneck_ms:>11.4f} "
                  f"{sol.bottleneck_ms / dp.bottleneck_ms - 1:>10.2e} "
                  f"{sol.rounding_error_ms / dp.bottleneck_ms:>9.1e}")


def pipedream_section(case_limit_s: float, ks: tuple[int, ...], link: str,
                      names: list[str] | None) -> None:
    print(f"\n== PipeDream graph profiles: convex graph partition vs the best chain split of "
          f"the layer order ==\nB=M=4, link {link}, recompute never, no memory limit, "
          f"{case_limit_s:g} s per case. chain_ms: the DP on the layer order (free link: "
          f"exactly the best chain split of that order) or, with a link, the best chain split "
          f"under graph costs (CP-SAT restricted to ranges of the order; * = not proven optimal "
          f"in time, so the gain may be overstated); gain = chain/graph-1")
    print(f"{'model':<26} {'L':>5} {'K':>2} {'status':>9} {'solve_s':>8} {'gap':>7} "
          f"{'graph_ms':>10} {'chain_ms':>10} {'gain':>7}")
    gains: dict[int, list[float]] = {}
    for path in sorted(PIPEDREAM.glob("*.json")):
        if names and path.stem not in names:
            continue
        prof = load_profile(path)
        for k in ks:
            cm = CostModel(prof, 4, 4, stages=k, link=LINKS[link])
            sol = partition_graph(cm, time_limit_s=case_limit_s)
            mark = ""
            if link == "free":
                chain_ms = dp_as_graph(cm, math.inf)[0]
            else:
                chain = partition_graph(cm, time_limit_s=case_limit_s, chain_order=True)
                chain_ms, mark = chain.bottleneck_ms, "" if chain.status == "optimal" else "*"
            gain = chain_ms / sol.bottleneck_ms - 1
            gains.setdefault(k, []).append(gain)
            print(f"{path.stem:<26} {prof.num_layers:>5} {k:>2} {sol.status:>9} "
                  f"{sol.solve_s:>8.2f} {100 * sol.gap:>6.2f}% {sol.bottleneck_ms:>10.2f} "
                  f"{chain_ms:>10.2f} {100 * gain:>6.2f}%{mark}", flush=True)
    for k, vals in sorted(gains.items()):
        print(f"K={k}: gain mean {100 * statistics.mean(vals):.2f}%, max {100 * max(vals):.2f}%, "
              f"models improved {sum(v > 1e-6 for v in vals)}/{len(vals)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and short limits")
    p.add_argument("--case-limit", type=float, default=None,
                   help="CP-SAT seconds per PipeDream case (default 10, quick 2)")
    args = p.parse_args()
    if args.quick:
        dag_section(60, 10.0)
        chain_section(200, 20.0)
        pipedream_section(args.case_limit or 2.0, (2, 4), "free",
                          ["resnet18", "gnmt", "vgg16"])
        return
    dag_section(200, 30.0)
    chain_section(1000, 60.0)
    limit = args.case_limit or 10.0
    pipedream_section(limit, (2, 4, 8), "free", None)
    pipedream_section(limit, (2, 4, 8), "pcie", ["resnet50", "inception_v3", "gnmt"])


if __name__ == "__main__":
    main()
