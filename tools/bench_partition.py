"""Benchmark of the exact chain partitioner: solve time at scale, and bottleneck ratios of the
splits other tools make by default against the exact one, on real profiles.

    python tools/bench_partition.py            # all sections
    python tools/bench_partition.py --quick    # smaller sizes (used by the test suite)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from partitioner.cost.model import CostModel
from partitioner.cost.partition import stage_costs
from partitioner.formats.assumptions import LINKS
from partitioner.formats.profile import DeviceInfo, LayerProfile, Profile, load_profile
from partitioner.solve.baselines import balanced_weights, equal_layers
from partitioner.solve.chain import partition_chain

PIPEDREAM = Path(__file__).resolve().parents[1] / "profiles" / "pipedream"


def synthetic(num_layers: int, seed: int) -> Profile:
    """A chain with random compute, parameters, activations and boundary sizes."""
    rng = random.Random(seed)
    layers = []
    for i in range(num_layers):
        fwd = rng.uniform(0.05, 2.0)
        act = float(rng.randint(10**5, 10**7))
        layers.append(LayerProfile(str(i), "Random", 4 * rng.randint(10**4, 10**7), (fwd,),
                                   (2 * fwd,), (act,), (act,), (float(rng.randint(10**5, 10**8)),)))
    return Profile(f"random-{num_layers}", DeviceInfo("synthetic", "cuda", 80 * 2**30),
                   "float32", (1,), tuple(layers))


def timing(quick: bool) -> None:
    print("== solve time (exact chain partition, memory-limited) ==")
    print(f"{'L':>8} {'K':>4} {'recompute':>10} {'solve_s':>8} {'bottleneck_ms':>14}")
    sizes = [(200, 16), (2_000, 8)] if quick else [(1_000, 64), (100_000, 8)]
    for num_layers, k in sizes:
        prof = synthetic(num_layers, seed=num_layers)
        for recompute in ("never", "always"):
            cm = CostModel(prof, 32, 32, stages=k, recompute=recompute, link=LINKS["nvlink"])
            # a limit 20% above a perfect memory balance: binding for most stages
            total = cm.param_state_bytes().sum() + 32 * cm.layer_array("saved_bytes").sum()
            limit = 1.2 * total / k
            start = time.perf_counter()
            sol = partition_chain(cm, limit)
            took = time.perf_counter() - start
            print(f"{num_layers:>8} {k:>4} {recompute:>10} {took:>8.3f} {sol.bottleneck_ms:>14.2f}")


def ratios(cm: CostModel) -> tuple[float, float]:
    """Bottleneck of equal layer counts and of balanced parameters, over the exact optimum."""
    n, k = cm.profile.num_layers, cm.stages
    exact = partition_chain(cm).bottleneck_ms
    equal = stage_costs(cm, equal_layers(n, k)).bottleneck_ms
    params = balanced_weights([lay.param_bytes for lay in cm.profile.layers], k)
    return equal / exact, stage_costs(cm, params).bottleneck_ms / exact


def h200_ratios() -> None:
    print("\n== H200 profiles: default splits against the exact plan (bottleneck ratio, >= 1) ==")
    print("gpt: B=16, M=8; resnet50: B=128, M=8; recompute except_last, NVLink")
    print(f"{'profile':<18} {'K':>3} {'equal_layers':>13} {'param_balance':>14}")
    for name, batch in (("h200/gpt2-medium", 16), ("h200/gpt-1.3b", 16), ("h200/resnet50", 128)):
        prof = load_profile(name)
        for k in (2, 4, 8):
            cm = CostModel(prof, batch, 8, stages=k, recompute="except_last",
                           link=LINKS["nvlink"])
            eq, pb = ratios(cm)
            print(f"{name:<18} {k:>3} {eq:>13.3f} {pb:>14.3f}")


def pipedream_ratios() -> None:
    print("\n== PipeDream profiles as chains (topological order): default splits / exact ==")
    print("M=B=4, free communication, no memory limit; geometric mean and worst over models")
    rows: dict[int, list[tuple[float, float]]] = {}
    for path in sorted(PIPEDREAM.glob("*.json")):
        prof = load_profile(path)
        prof = Profile(prof.model, prof.device, prof.dtype, prof.microbatch_sizes, prof.layers)
        cells = []
        for k in (2, 4, 8, 16):
            if k > prof.num_layers:
                continue
            eq, pb = ratios(CostModel(prof, 4, 4, stages=k, link=LINKS["free"]))
            rows.setdefault(k, []).append((eq, pb))
            cells.append(f"K={k}: {eq:.2f}/{pb:.2f}")
        print(f"{prof.model:<26} " + "  ".join(cells))
    print(f"{'K':>3} {'equal_geomean':>14} {'equal_worst':>12} {'param_geomean':>14} "
          f"{'param_worst':>12}")
    for k, vals in sorted(rows.items()):
        eq = [v[0] for v in vals]
        pb = [v[1] for v in vals]
        print(f"{k:>3} {statistics.geometric_mean(eq):>14.3f} {max(eq):>12.3f} "
              f"{statistics.geometric_mean(pb):>14.3f} {max(pb):>12.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = p.parse_args()
    timing(args.quick)
    h200_ratios()
    pipedream_ratios()


if __name__ == "__main__":
    main()
