"""What the command line prints about a plan, a simulation and a search: tables and summaries.

    >>> from partitioner import CostModel, load_profile, make_plan
    >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=2)
    >>> print(plan_report(make_plan(cm), cm).splitlines()[0])
    gpt2-medium on NVIDIA H200: K=2 stages, M=4 micro-batches of 4 (B=16), schedule=gpipe, recompute=never
"""

from __future__ import annotations

from partitioner.cost.model import CostModel, bytes_per_param, split_microbatches
from partitioner.cost.partition import evaluate_assignment
from partitioner.formats.layers import stage_of_nodes
from partitioner.formats.plan import Plan
from partitioner.formats.units import format_bytes
from partitioner.report.tables import format_ranges, format_table
from partitioner.simulator.engine import SimResult
from partitioner.solve.search import SearchResult

__all__ = ["GRAPH_NOTE", "messages_table", "plan_report", "search_table", "simulate_report"]

#: Printed under the table of a graph-shaped plan.
GRAPH_NOTE = ("graph-shaped plan: each stage is a convex set of layer-graph nodes (listed as "
              "'nodes' in the plan), not a layer range; the executor runs layer-range plans "
              "only for now")


def _where(plan: Plan, k: int) -> str:
    stage = plan.stages[k]
    if stage.nodes is not None:
        return format_ranges(stage.nodes)
    return f"[{stage.layers[0]}, {stage.layers[1]})"


def _ideal(stages: int, microbatches: int) -> float:
    """GPipe's bubble for balanced stages, (K-1)/(M+K-1) (paper, Section 2.3)."""
    return (stages - 1) / (microbatches + stages - 1)


def plan_report(plan: Plan, cm: CostModel) -> str:
    """The per-stage table of a plan with its predicted step time and bubble."""
    pred = plan.predicted
    if pred is None:
        raise ValueError("the plan carries no prediction; make it with make_plan, or simulate "
                         "it (partition-model simulate PLAN.json)")
    big_k, m = plan.num_stages, plan.microbatches
    comm = pred.stage_comm_ms or (0.0,) * big_k
    stage_ms = [c + t for c, t in zip(pred.stage_compute_ms, comm, strict=True)]
    bottleneck = max(stage_ms)
    nodes = plan.stage_nodes()
    sent = evaluate_assignment(cm, stage_of_nodes(nodes)).stage_sent_bytes
    rows = [[k, _where(plan, k), len(nodes[k]), s.device, f"{pred.stage_compute_ms[k]:.3f}",
             f"{comm[k]:.3f}", format_bytes(sent[k]) if sent[k] else "-",
             format_bytes(pred.stage_peak_bytes[k]),
             f"{100 * stage_ms[k] / bottleneck:.1f}%" if bottleneck > 0 else "-"]
            for k, s in enumerate(plan.stages)]
    headers = ["stage", "nodes" if plan.is_graph else "layers", "n", "device", "compute_ms",
               "comm_ms", "sent", "memory", "share"]
    b = cm.microbatch_size
    sizes = sorted(set(split_microbatches(plan.replica_batch, m)))
    copies = (f" x D={plan.replicas} replicas ({plan.world_size} ranks)"
              if plan.replicas > 1 else "")
    share = f", {plan.replica_batch} per replica" if plan.replicas > 1 else ""
    head = (f"{plan.profile_model} on {plan.profile_device}: K={big_k} stages{copies}, M={m} "
            f"micro-batches of {'/'.join(map(str, sizes))} (B={plan.global_batch}{share}), "
            f"schedule={plan.schedule}, recompute={plan.recompute}")
    assumptions = (f"memory limit {format_bytes(plan.memory_limit_bytes)}; optimizer "
                   f"{plan.optimizer} ({bytes_per_param(cm.profile.dtype, plan.optimizer):g} "
                   f"bytes/parameter for {cm.profile.dtype}"
                   f"{', optimizer state sharded over the replicas' if plan.shard_optimizer else ''}"
                   f"); link {plan.link.describe()}; times per micro-batch of {b}")
    if plan.topology is not None:
        assumptions += f"\ntopology {plan.topology.describe()}"
    rt = plan.runtime
    if (rt.compute_scale, rt.action_ms, rt.message_ms) != (1.0, 0.0, 0.0):
        assumptions += (f"; runtime: actions take {rt.compute_scale:g} x profiled + "
                        f"{rt.action_ms:g} ms, messages arrive {rt.message_ms:g} ms after "
                        f"their send")
    if rt.device is not None:
        assumptions += f"\n{rt.device.describe()} (--device-model none: as profiled)"
    summary = (f"predicted step {pred.step_ms:.3f} ms ({pred.method}), bubble "
               f"{100 * pred.bubble_fraction:.1f}% (balanced ideal (K-1)/(M+K-1) = "
               f"{100 * _ideal(big_k, m):.1f}%)\nbottleneck stage {bottleneck:.3f} ms per "
               f"micro-batch; closed form (M+K-1) x bottleneck = "
               f"{(m + big_k - 1) * bottleneck:.3f} ms")
    lines = [head, assumptions, "", format_table(headers, rows), "", summary]
    if plan.is_graph:
        lines.append(GRAPH_NOTE)
    if plan.tied:
        lines.append("tied parameters (on each stage listed; those without the owner layer "
                     "hold a copy): " + "; ".join(
            f"{name} on stage{'s' if len(held) > 1 else ''} {', '.join(map(str, held))}"
            for name, held in plan.tied.items()))
    if plan.messages:
        lines += ["", messages_table(plan)]
    return "\n".join(lines)


def messages_table(plan: Plan) -> str:
    """What each stage sends each later one per micro-batch (the plan's ``messages``).

        >>> from partitioner import CostModel, load_profile, make_plan
        >>> plan = make_plan(CostModel(load_profile("pipedream/resnet18"), 4, 4, stages=2))
        >>> print(messages_table(plan).splitlines()[-1])
        0 -> 1       1  196.00 MiB  196.00 MiB
    """
    rows = [[f"{src} -> {dst}", len(msg.values), format_bytes(msg.bytes),
             format_bytes(msg.grad_bytes) if msg.grad_bytes else "-"]
            for (src, dst), msg in sorted(plan.messages.items())]
    b = -(-plan.replica_batch // plan.microbatches)
    return (f"messages between stages, per micro-batch of {b} (the values each stage sends "
            f"each later one; gradients come back):\n"
            + format_table(["stages", "values", "bytes", "grad_bytes"], rows))


def simulate_report(plan: Plan, cm: CostModel, res: SimResult, devices: list[int]) -> str:
    """What ``partition-model simulate`` prints: each stage's busy, sending and idle time and
    peak memory, then the step."""
    big_k, m = plan.num_stages, cm.microbatches
    head = (f"{plan.profile_model}: K={big_k} stages on {len(set(devices))} device(s), M={m} "
            f"(B={cm.global_batch}), schedule={cm.schedule}, recompute={cm.recompute}, "
            f"link {cm.link.describe()}")
    rows = [[k, _where(plan, k), devices[k], f"{res.stage_busy_ms[k]:.3f}",
             f"{res.stage_comm_ms[k]:.3f}",
             f"{max(0.0, res.step_ms - res.stage_busy_ms[k] - res.stage_comm_ms[k]):.3f}",
             format_bytes(res.stage_peak_bytes[k])] for k in range(big_k)]
    table = format_table(["stage", "nodes" if plan.is_graph else "layers", "device", "busy_ms",
                          "send_ms", "idle_ms", "peak_memory"], rows)
    rate = f"{1000 * cm.global_batch / res.step_ms:.1f}" if res.step_ms > 0 else "-"
    summary = (f"simulated step {res.step_ms:.3f} ms, bubble {100 * res.bubble_fraction:.1f}% "
               f"(balanced ideal {100 * _ideal(big_k, m):.1f}%), {rate} samples/s")
    if plan.predicted is not None:
        summary += f"; the plan predicted {plan.predicted.step_ms:.3f} ms"
    return "\n".join([head, "", table, "", summary])


def search_table(result: SearchResult, top: int = 10) -> str:
    """The ``top`` fastest candidates as a table, with how many were tried and how the
    partitions were found (``partition``: exact, optimal, the proven gap, or layer order)."""
    rows = []
    dp = result.replicas != (1,)  # a D column when the search tried replicas
    for rank, c in enumerate(result.candidates[:top], 1):
        sizes = sorted(set(split_microbatches(c.cost_model.replica_batch, c.microbatches)),
                       reverse=True)
        samples_s = 1000.0 * c.cost_model.global_batch / c.step_ms if c.step_ms > 0 else 0.0
        rows.append([rank, c.stages, *([c.replicas] if dp else []), c.microbatches,
                     "/".join(map(str, sizes)), c.schedule,
                     c.recompute, f"{c.step_ms:.2f}", f"{samples_s:.1f}",
                     f"{100 * c.bubble_fraction:.1f}%", f"{c.solution.bottleneck_ms:.3f}",
                     c.solution.quality, format_bytes(c.peak_bytes)])
    headers = ["rank", "K", *(["D"] if dp else []), "M", "b", "schedule", "recompute",
               "step_ms", "samples/s",
               "bubble", "bottleneck_ms", "partition", "peak_memory"]
    timeout = (f", {result.unsolved} found no partition within the ILP's time limit"
               if result.unsolved else "")
    summary = (f"{result.tried} configurations tried in {result.seconds:.2f} s: "
               f"{len(result.candidates)} fit, {result.infeasible} exceed the memory limit "
               f"({format_bytes(result.memory_limit_bytes)}){timeout}"
               + (f", {result.skipped} skipped (their lower bound is slower than the rows "
                  f"shown)" if result.skipped else ""))
    how = {"dp": "the chain DP", "ilp": "CP-SAT on the layer graph", "custom": "the given "
           "function"}[result.solver]
    solver = f"partitions: {result.solves} solved by {how}"
    if any(c.solution.status == "layer order" for c in result.candidates):
        solver += " (splits of the layer order, costed on the graph)"
    if result.time_limit_s is not None:
        graph = [c.solution for c in result.candidates
                 if c.solution.status in ("optimal", "feasible")]
        proven = sum(sol.status == "optimal" for sol in graph)
        worst = max((sol.gap for sol in graph), default=0.0)
        solver += (f", at most {result.time_limit_s:g} s each; {proven} of the {len(graph)} "
                   f"fitting configurations proven optimal"
                   + (f", the others within {100 * worst:.2f}%" if proven < len(graph) else ""))
    return format_table(headers, rows) + "\n" + summary + "\n" + solver
