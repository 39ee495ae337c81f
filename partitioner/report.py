"""Plain-text tables for the command line.

    >>> print(format_table(["k", "ms"], [[0, "1.5"], [1, "12.0"]]))
    k    ms
    0   1.5
    1  12.0
"""

from __future__ import annotations

from collections.abc import Sequence

from .costs import CostModel, Runtime, bytes_per_param
from .plan import Plan
from .units import format_bytes

__all__ = ["format_ranges", "format_table", "plan_report"]

#: Printed under the table of a graph-shaped plan.
GRAPH_NOTE = ("graph-shaped plan: each stage is a convex set of layer-graph nodes (listed as "
              "'nodes' in the plan), not a layer range; the executor runs chain plans only "
              "for now")


def format_ranges(nodes: Sequence[int], max_chars: int = 40) -> str:
    """Sorted layer indices as compact runs, cut to about ``max_chars`` characters.

        >>> format_ranges([0, 1, 2, 5, 7, 8]), format_ranges(range(0, 40, 2), max_chars=12)
        ('0-2,5,7-8', '0,2,4,6,8,… (20 runs)')
    """
    nodes = list(nodes)
    runs: list[str] = []
    i = 0
    while i < len(nodes):
        j = i
        while j + 1 < len(nodes) and nodes[j + 1] == nodes[j] + 1:
            j += 1
        runs.append(str(nodes[i]) if i == j else f"{nodes[i]}-{nodes[j]}")
        i = j + 1
    text = ",".join(runs)
    if len(text) <= max_chars:
        return text
    shown = text[:max_chars].rsplit(",", 1)[0]
    return f"{shown},… ({len(runs)} runs)"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns right-aligned except the first, two spaces apart."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                      strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def plan_report(plan: Plan, cm: CostModel) -> str:
    """The per-stage table of a chain plan with its predicted step time and bubble."""
    pred = plan.predicted
    assert pred is not None, "plan_report needs a plan with predictions"
    stage_ms = [c + m for c, m in zip(pred.stage_compute_ms, pred.stage_comm_ms or
                                      (0.0,) * plan.num_stages, strict=True)]
    bottleneck = max(stage_ms)
    out_bytes = cm.layer_array("out_bytes")
    sent: tuple[float, ...] = ()
    if plan.is_graph:
        from .graph import evaluate_assignment, stage_of_nodes

        sent = evaluate_assignment(cm, stage_of_nodes([s.nodes or () for s in plan.stages])
                                   ).stage_sent_bytes
    rows = []
    for k, s in enumerate(plan.stages):
        start, end = s.layers
        boundary = format_bytes(out_bytes[end - 1]) if k < plan.num_stages - 1 else "-"
        where, count = f"[{start}, {end})", end - start
        if s.nodes is not None:
            where, count = format_ranges(s.nodes), len(s.nodes)
            boundary = format_bytes(sent[k]) if sent[k] else "-"
        rows.append([k, where, count, s.device,
                     f"{pred.stage_compute_ms[k]:.3f}",
                     f"{stage_ms[k] - pred.stage_compute_ms[k]:.3f}", boundary,
                     format_bytes(pred.stage_peak_bytes[k]),
                     f"{100 * stage_ms[k] / bottleneck:.1f}%"])
    headers = ["stage", "nodes" if plan.is_graph else "layers", "n", "device", "compute_ms",
               "comm_ms", "sent" if plan.is_graph else "boundary",
               "memory", "share"]
    b = cm.microbatch_size
    sizes = sorted(set([cm.global_batch // cm.microbatches, b]))
    head = (f"{plan.profile_model} on {plan.profile_device}: K={plan.num_stages} stages, "
            f"M={plan.microbatches} micro-batches of {'/'.join(map(str, sizes))} (B="
            f"{plan.global_batch}), schedule={plan.schedule}, recompute={plan.recompute}")
    link = ("free" if plan.link.bandwidth_gbps == float("inf") and plan.link.latency_ms == 0
            else f"{plan.link.bandwidth_gbps:g} GB/s + {plan.link.latency_ms:g} ms")
    assumptions = (f"memory limit {format_bytes(plan.memory_limit_bytes)}; optimizer "
                   f"{plan.optimizer} ({bytes_per_param(cm.profile.dtype, plan.optimizer):g} "
                   f"bytes/parameter for {cm.profile.dtype}); link {link}; times per "
                   f"micro-batch of {b}")
    if plan.runtime != Runtime():
        assumptions += (f"; runtime: actions take {plan.runtime.compute_scale:g} x profiled + "
                        f"{plan.runtime.action_ms:g} ms, messages arrive "
                        f"{plan.runtime.message_ms:g} ms after their send")
    summary = (f"predicted step {pred.step_ms:.3f} ms ({pred.method}: (M+K-1) x bottleneck "
               f"{bottleneck:.3f} ms), bubble {100 * pred.bubble_fraction:.1f}% "
               f"(balanced ideal (K-1)/(M+K-1) = "
               f"{100 * (plan.num_stages - 1) / (plan.microbatches + plan.num_stages - 1):.1f}%)")
    if pred.method != "closed-form":
        summary = (f"predicted step {pred.step_ms:.3f} ms ({pred.method}: the schedule "
                   f"replayed), bubble {100 * pred.bubble_fraction:.1f}% (balanced ideal "
                   f"{100 * (plan.num_stages - 1) / (plan.microbatches + plan.num_stages - 1):.1f}%)"
                   f"\nbottleneck stage {bottleneck:.3f} ms per micro-batch; closed form "
                   f"(M+K-1) x bottleneck = "
                   f"{(plan.microbatches + plan.num_stages - 1) * bottleneck:.3f} ms")
    lines = [head, assumptions, "", format_table(headers, rows), "", summary]
    if plan.is_graph:
        ranges = all(s.nodes is not None and len(s.nodes) == s.layers[1] - s.layers[0]
                     for s in plan.stages)
        lines.append(GRAPH_NOTE + (" (these stages happen to be layer ranges too)" if ranges
                                   else ""))
    return "\n".join(lines)
