"""Benchmark of graph planning: the convex partition against the best chain order and equal layer counts.

    python tools/bench_graph.py                          # PipeDream graphs, a U-Net, 2,000 layers
    python tools/bench_graph.py --profile traced.json    # also a traced model's profile (repeatable)
    python tools/bench_graph.py --pipedream resnet18 --ks 2 --traced-layers 200   # a quick look

For each graph profile at K = 2, 3, 4: the bottleneck of the convex graph partition (CP-SAT,
``partition(..., solver="ilp")``), of the best split of the topological layer order (the chain
DP, costed on the graph: ``solver="dp"``) and of equal layer counts, the last two as ratios
against the convex one, each with its planning time. Then a 2,000-layer traced-like graph
(a Llama-like stack: an embedding whose hidden states, mask and rotary cos/sin every block
reads, residual skips, random longer skips, ordering-only edges, a tied head) at K=8 under the
planner's default time limit: its status (optimal, or the proven gap) and time.

``--models tiny-llama,tiny-unet,...`` adds the traced example models (executor.workloads.
graphmodels): each is profiled in context on two local ranks at once (one thread each, as the
pipeline's ranks run), compared as above, and with ``--measure`` its K=2 plans at several M are
predicted by the simulator (runtime calibrated on a short trial at M=1 and 4, as
tools/bench_fidelity.py does) and trained on two local ranks (the distributed executor, each
rank built on the meta device with its stage loaded), timing each step: predicted against
measured, and the median |error| (goal <= 10%). ``--rounds`` (default 3) repeats calibration
and measurement of every model in turn; each configuration's error is its rounds' median.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from partitioner.cost.model import CostModel
from partitioner.cost.partition import Solution, evaluate_assignment
from partitioner.formats.assumptions import LINKS, Link
from partitioner.formats.profile import (
    DeviceInfo,
    LayerProfile,
    OutputValue,
    Profile,
    TiedParam,
    load_profile,
)
from partitioner.solve.baselines import equal_layers
from partitioner.solve.planner import partition

PIPEDREAM = Path(__file__).resolve().parents[1] / "profiles" / "pipedream"
DEFAULT_LIMIT_S = partition.__defaults__[2]  # type: ignore[index]  # the planner's time limit


def _layer(rng: random.Random, name: str, kind: str, fwd_ms: float, act_bytes: float,
           param_bytes: int, outputs: tuple[OutputValue, ...] | None = None) -> LayerProfile:
    fwd = fwd_ms * rng.uniform(0.7, 1.3)
    return LayerProfile(name, kind, param_bytes, (fwd,), (2 * fwd,), (act_bytes,), (act_bytes,),
                        (act_bytes,), outputs=outputs)


def unet(levels: int = 5, per_level: int = 3, seed: int = 0) -> Profile:
    """A U-Net: ``levels`` encoder stages of ``per_level`` convolutions (each halving the
    activation), a bottleneck, and the mirrored decoder whose first layer at each level also
    reads the encoder output of that level (the long skips)."""
    rng = random.Random(seed)
    layers: list[LayerProfile] = []
    edges: set[tuple[int, int]] = set()
    skips: list[int] = []
    act = 64e6
    for level in range(levels):
        for j in range(per_level):
            if layers:
                edges.add((len(layers) - 1, len(layers)))
            layers.append(_layer(rng, f"enc{level}.{j}", "Conv2d", 2.0, act, 4 * 9 * 64 ** 2
                                 * 2 ** level))
        skips.append(len(layers) - 1)
        act /= 2
    edges.add((len(layers) - 1, len(layers)))
    layers.append(_layer(rng, "bottleneck", "Conv2d", 2.0, act, 4 * 9 * 64 ** 2 * 2 ** levels))
    for level in reversed(range(levels)):
        act *= 2
        for j in range(per_level):
            edges.add((len(layers) - 1, len(layers)))
            if j == 0:
                edges.add((skips[level], len(layers)))
            layers.append(_layer(rng, f"dec{level}.{j}", "Conv2d", 2.0, act, 4 * 9 * 64 ** 2
                                 * 2 ** level))
    return Profile("unet-synthetic", DeviceInfo("synthetic", "cuda", 80 * 2**30), "float32", (1,),
                   tuple(layers), how="synthetic (tools/bench_graph.py)", edges=tuple(sorted(edges)))


def traced_like(num_layers: int, seed: int = 0) -> Profile:
    """A Llama-like traced graph of about ``num_layers`` layers, every layer listing its
    outputs as a tracer writes them: layer 0 (the embedding) outputs hidden states, a mask and
    rotary cos/sin (the last three without gradient); each block of 6 layers (norm, attention,
    add, norm, MLP, add) has its residual skips and its attention reads mask, cos and sin from
    the embedding; 1 in 25 layers also reads a random layer of the last 60 (a longer skip),
    1 in 50 has an ordering-only edge; the head shares the embedding's weight (tied)."""
    rng = random.Random(seed)
    hidden = 8e6
    embed_bytes = 4 * 32000 * 2048
    layers = [_layer(rng, "embed", "Embedding", 0.3, hidden, embed_bytes, (
        OutputValue("hidden", (hidden,)), OutputValue("mask", (2e6,), False),
        OutputValue("cos", (0.5e6,), False), OutputValue("sin", (0.5e6,), False)))]
    reads: dict[tuple[int, int], tuple[int, ...]] = {}  # edge -> the outputs of src it reads

    def add(kind: str, fwd_ms: float, params: int, act: float = hidden) -> int:
        i = len(layers)
        layers.append(_layer(rng, f"{kind}_{i}", kind, fwd_ms, act, params,
                             (OutputValue(f"{kind}_{i}", (act,)),)))
        return i

    stream = 0  # the residual stream's latest layer
    while len(layers) < num_layers - 2:
        for half, (kind, fwd_ms, params) in enumerate((("attn", 1.5, 4 * 4 * 2048**2),
                                                       ("mlp", 2.5, 4 * 3 * 2048 * 5632))):
            norm = add("norm", 0.1, 0)
            reads[stream, norm] = (0,)
            body = add(kind, fwd_ms, params)
            reads[norm, body] = (0,)
            if half == 0:
                reads[0, body] = (1, 2, 3)  # mask, cos, sin (layer 0 is never its norm)
            res = add("add", 0.05, 0)
            reads[body, res] = reads[stream, res] = (0,)
            stream = res
    for v in range(2, len(layers)):
        if rng.random() < 1 / 25:
            reads.setdefault((rng.randrange(max(1, v - 60), v - 1), v), (0,))
        if rng.random() < 1 / 50:
            reads.setdefault((rng.randrange(max(1, v - 60), v - 1), v), ())
    norm = add("norm", 0.1, 0)
    reads[stream, norm] = (0,)
    head = add("head", 3.0, 0, act=4 * 32000 * 1024)
    reads[norm, head] = (0,)
    pairs = sorted(reads)
    return Profile(f"traced-like-{len(layers)}", DeviceInfo("synthetic", "cuda", 80 * 2**30),
                   "bfloat16", (1,), tuple(layers), how="synthetic (tools/bench_graph.py)",
                   edges=tuple(pairs), edge_values=tuple(reads[e] for e in pairs),
                   tied=(TiedParam("embed.weight", embed_bytes, (0, head)),))


def _timed(cm: CostModel, solver: str, limit_s: float) -> tuple[Solution, float]:
    start = time.perf_counter()
    sol = partition(cm, solver=solver, time_limit_s=limit_s, explain=False)
    return sol, time.perf_counter() - start


def compare(name: str, prof: Profile, ks: list[int], link: str, limit_s: float) -> None:
    """One row per K: convex (CP-SAT), chain order (DP) and equal layers."""
    for k in ks:
        if k > prof.num_layers:
            continue
        cm = CostModel(prof, 4, 4, stages=k, link=LINKS[link])
        graph, graph_s = _timed(cm, "ilp", limit_s)
        chain, chain_s = _timed(cm, "dp", limit_s)
        start = time.perf_counter()
        cuts = equal_layers(prof.num_layers, k)
        equal = evaluate_assignment(cm, [s for s in range(k) for _ in range(cuts[s], cuts[s + 1])])
        equal_s = time.perf_counter() - start
        top = graph.bottleneck_ms
        print(f"{name:<24} {prof.num_layers:>5} {k:>2} {graph.quality:>11} {top:>10.3f} "
              f"{graph_s:>7.2f} {chain.bottleneck_ms / top:>9.3f} {chain_s:>7.3f} "
              f"{equal.bottleneck_ms / top:>9.3f} {equal_s:>7.3f}", flush=True)


def _profile_rank(name: str, sizes: list[int]) -> Profile:
    from executor.profiling.profiler import profile_model
    from executor.workloads.graphmodels import build_graph_model

    w = build_graph_model(name, batch=max(sizes))
    return profile_model(w.model, w.sample, sizes, "cpu", threads=1, name=name)


def traced_profiles(names: list[str], sizes: list[int]) -> list[tuple[str, Profile]]:
    """Profiles of the example graph models, each taken on two local ranks at once."""
    from executor.distributed.spawn import spawn_local

    return [(name, spawn_local(_profile_rank, 2, (name, sizes), threads=1,
                               timeout_s=300.0)[0]) for name in names]


def _measure_round(name: str, prof: Profile, batch: int, ms: list[int], steps: int, link: Link,
                   tmp: str) -> list[tuple[int, list[int], float, float]]:
    """One round for one model: the runtime calibrated on a trial at M=1,4, then each M's K=2
    plan predicted and trained; (M, layers per stage, predicted ms, measured ms) per M."""

    from executor.distributed.spawn import spawn_local
    from executor.profiling.calibrate import measure_runtime, run_trials
    from partitioner.formats.plan import save_plan
    from partitioner.solve.planner import make_plan

    job = f"executor.workloads.graphjobs:{name.replace('-', '_')}"
    runtime = measure_runtime(job, prof, batch, link=link, microbatches=(1, 4))
    print(f"  {name}: actions take {runtime.compute_scale:.3f} x profiled + "
          f"{runtime.action_ms:.3f} ms, messages arrive {runtime.message_ms:.3f} ms after "
          f"their send", flush=True)
    plans, paths = [], []
    for m in ms:
        cm = CostModel(prof, batch, m, stages=2, link=link, runtime=runtime)
        plan = make_plan(cm, devices=["cpu", "cpu"], solver="auto")
        paths.append(str(Path(tmp) / f"{name}-{m}.json"))
        save_plan(plan, paths[-1])
        plans.append((m, plan))
    per_rank = spawn_local(run_trials, 2, (job, paths, 2, steps), threads=1, timeout_s=300.0)
    rows = []
    for j, (m, plan) in enumerate(plans):
        assert plan.predicted is not None
        measured = max(statistics.median(r[j].step_ms) for r in per_rank)
        rows.append((m, [len(n) for n in plan.stage_nodes()], plan.predicted.step_ms, measured))
    return rows


def measure(cases: list[tuple[str, Profile]], batch: int, ms: list[int], steps: int,
            rounds: int) -> None:
    """Predicted against measured steps of K=2 plans on two local ranks, in ``rounds`` rounds
    that each calibrate and measure every model in turn: a configuration's error is the
    median of its rounds' errors, each round's prediction calibrated minutes, not tens of
    minutes, before its measurement (this shared host's speed drifts by 10-40% over minutes,
    and a model measured only once takes whatever drift its turn met)."""
    import tempfile

    from executor.profiling.calibrate import measure_link

    link = measure_link()
    print(f"\n== predicted vs measured, K=2 on two local ranks, B={batch}, {rounds} round(s) "
          f"==\nlink (gloo): {link.bandwidth_gbps:.2f} GB/s + {link.latency_ms:.3f} ms")
    results: dict[tuple[str, int], list[tuple[list[int], float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            print(f"round {r + 1} of {rounds}; runtime fitted on a trial at M=1,4:", flush=True)
            for name, prof in cases:
                for m, nodes, predicted, measured in _measure_round(name, prof, batch, ms,
                                                                    steps, link, tmp):
                    results.setdefault((name, m), []).append((nodes, predicted, measured))
    print(f"{'model':<12} {'M':>3} {'stages':<22} {'predicted_ms':>12} {'measured_ms':>11} "
          f"{'error':>7}  rounds")
    errors, held_out = [], []
    for (name, m), runs in results.items():
        errs = [(p - x) / x for _, p, x in runs]
        err = statistics.median(errs)
        errors.append(abs(err))
        if m not in (1, 4):
            held_out.append(abs(err))
        layouts = {str(nodes) for nodes, _, _ in runs}
        print(f"{name:<12} {m:>3} {'/'.join(sorted(layouts)) + ' layers':<22} "
              f"{statistics.median(p for _, p, _ in runs):>12.2f} "
              f"{statistics.median(x for _, _, x in runs):>11.2f} {100 * err:>+6.1f}%  "
              + " ".join(f"{100 * e:+.1f}" for e in errs), flush=True)
    line = (f"median |error| over {len(errors)} configurations: "
            f"{100 * statistics.median(errors):.1f}% (goal <= 10%)")
    if held_out:
        line += f"; at the M not calibrated on: {100 * statistics.median(held_out):.1f}%"
    print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", action="append", default=[], metavar="PROFILE.json",
                   help="a graph profile to add (e.g. a traced model's); repeatable")
    p.add_argument("--pipedream", action="append", default=None, metavar="NAME",
                   help="only these shipped PipeDream profiles (default: all); repeatable")
    p.add_argument("--ks", default="2,3,4", help="stage counts to compare (default 2,3,4)")
    p.add_argument("--link", default="nvlink", choices=sorted(LINKS), help="(default nvlink)")
    p.add_argument("--case-limit", type=float, default=10.0,
                   help="CP-SAT seconds per comparison case (default 10)")
    p.add_argument("--traced-layers", type=int, default=2000,
                   help="layers of the traced-like graph (default 2000; 0: skip it)")
    p.add_argument("--traced-stages", type=int, default=8, help="its K (default 8)")
    p.add_argument("--traced-limit", type=float, default=DEFAULT_LIMIT_S,
                   help=f"its CP-SAT seconds (default: the planner's, {DEFAULT_LIMIT_S:g})")
    p.add_argument("--models", default="",
                   help="traced example models to add, e.g. tiny-llama,tiny-unet (profiled "
                        "here: needs torch, and transformers for the Transformers ones)")
    p.add_argument("--measure", action="store_true",
                   help="also predict and measure K=2 steps of the --models on two ranks")
    p.add_argument("--global-batch", type=int, default=16, help="B of the measured runs")
    p.add_argument("--microbatches", default="1,2,4,8", help="M of the measured runs")
    p.add_argument("--steps", type=int, default=6, help="timed steps per measured run")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of calibrating and measuring every model (default 3; a "
                        "configuration's error is its rounds' median)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: give at least 1")
    ks = [int(k) for k in args.ks.split(",")]
    ms = [int(m) for m in args.microbatches.split(",")]
    models = [m for m in args.models.split(",") if m]
    sizes = sorted({-(-args.global_batch // m) for m in ms} | {args.global_batch // m for m in ms})
    traced = traced_profiles(models, sizes) if models else []

    cases: list[tuple[str, Profile]] = []
    names = args.pipedream
    for path in sorted(PIPEDREAM.glob("*.json")):
        if names is None or path.stem in names:
            cases.append((f"pipedream/{path.stem}", load_profile(path)))
    cases.append(("unet (synthetic)", unet()))
    cases += [(Path(path).stem, load_profile(path)) for path in args.profile]
    cases += traced
    print(f"== convex graph partition vs the best chain order and equal layer counts ==\n"
          f"B=M=4, link {args.link}, no memory limit, CP-SAT {args.case_limit:g} s per case; "
          f"chain/convex and equal/convex: bottleneck ratios (1 = as good)")
    print(f"{'profile':<24} {'L':>5} {'K':>2} {'convex':>11} {'convex_ms':>10} {'ilp_s':>7} "
          f"{'chain/cvx':>9} {'dp_s':>7} {'equal/cvx':>9} {'eq_s':>7}")
    for name, prof in cases:
        if prof.edges is None:
            print(f"{name}: a chain profile (no edges); skipped")
            continue
        compare(name, prof, ks, args.link, args.case_limit)

    if args.traced_layers:
        prof = traced_like(args.traced_layers)
        k = args.traced_stages
        cm = CostModel(prof, 8, 8, stages=k, link=LINKS[args.link])
        print(f"\n== {prof.model}: {prof.num_layers} layers, {len(prof.edges or ())} edges, "
              f"{len(cm.values.values)} values, K={k}, B=M=8, CP-SAT limit "
              f"{args.traced_limit:g} s ==")
        sol, took = _timed(cm, "ilp", args.traced_limit)
        chain, _ = _timed(cm, "dp", args.traced_limit)
        print(f"status {sol.quality} in {took:.2f} s (limit {args.traced_limit:g} s); "
              f"bottleneck {sol.bottleneck_ms:.3f} ms (>= {sol.lower_bound_ms:.3f} ms proven); "
              f"chain order {chain.bottleneck_ms / sol.bottleneck_ms:.3f} x")
    if args.measure and traced:
        measure(traced, args.global_batch, ms, args.steps, args.rounds)


if __name__ == "__main__":
    main()
