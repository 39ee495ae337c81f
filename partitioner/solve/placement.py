"""Where D replicas of an R-rank pipeline go on a topology: replica-major or stage-major.

    >>> from partitioner.formats.assumptions import LINKS
    >>> topo = Topology(2, 4, LINKS["nvlink"], LINKS["ib"])
    >>> [(p.name, p.p2p_link.bandwidth_gbps, p.allreduce_link.bandwidth_gbps)
    ...  for p in placements(topo, rank_of=(0, 1, 2, 3), replicas=2)]
    [('replica-major', 450.0, 50.0), ('stage-major', 50.0, 450.0)]

Two layouts of the R x D global ranks (``layout[d][r]``: replica d's pipeline rank r):

- replica-major, the plan format's default d R + r: a replica's neighbouring stages on
  neighbouring ranks, so on one node where a node holds a whole pipeline (G a multiple of
  R): activations cross the fast link and only the all-reduce crosses nodes;
- stage-major, r D + d: the D copies of a stage on neighbouring ranks, so the all-reduce
  stays inside a node (G a multiple of D) and the activations cross nodes.

Each layout charges the pipeline's messages the slowest link any boundary between its
neighbouring ranks crosses (in any replica: the replicas run in lockstep) and each stage's
all-reduce the slowest link its group of D ranks crosses (``Topology.group_link``). Where
the two layouts cross the same links only the default is kept; otherwise the planner
simulates both and keeps the faster (``choose``), and ``why`` says what each moves where.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from partitioner.cost.allreduce import grad_bytes
from partitioner.cost.model import CostModel
from partitioner.cost.partition import Solution
from partitioner.formats.assumptions import Link
from partitioner.formats.plan_replicas import Layout, default_layout
from partitioner.formats.topology import Topology
from partitioner.formats.units import format_bytes
from partitioner.solve.bounds import rank_of as stage_ranks

__all__ = ["Placement", "Placements", "placed", "placements", "replica_problems",
           "stage_major_layout", "traffic", "why"]


@dataclass(frozen=True)
class Placement:
    """A layout of the replicas and the links it charges (``layout`` None: the default)."""

    name: str
    layout: Layout | None
    p2p_link: Link
    allreduce_link: Link


def stage_major_layout(pipeline_ranks: int, replicas: int) -> Layout:
    """layout[d][r] = r D + d: the D copies of pipeline rank r on neighbouring ranks.

        >>> stage_major_layout(2, 3)
        ((0, 3), (1, 4), (2, 5))
    """
    return tuple(tuple(r * replicas + d for r in range(pipeline_ranks))
                 for d in range(replicas))


def placements(topo: Topology, rank_of: Sequence[int], replicas: int) -> list[Placement]:
    """The layouts worth comparing for a schedule whose stage k runs on pipeline rank
    ``rank_of[k]``: replica-major, and stage-major where it crosses other links."""
    ranks = max(rank_of) + 1
    default = default_layout(ranks, replicas)
    out = [Placement("replica-major", None, *topo.layout_links(default, rank_of))]
    if replicas > 1 and ranks > 1:
        major = stage_major_layout(ranks, replicas)
        other = Placement("stage-major", major, *topo.layout_links(major, rank_of))
        if (other.p2p_link, other.allreduce_link) != (out[0].p2p_link, out[0].allreduce_link):
            out.append(other)
    return out


def placed(cm: CostModel, placement: Placement) -> CostModel:
    """``cm`` with the links ``placement`` charges."""
    return cm.like(link=placement.p2p_link, allreduce_link=placement.allreduce_link)


def traffic(cm: CostModel, sol: Solution) -> tuple[float, float]:
    """(bytes a replica's stages send each other per step, forward and gradients back;
    bytes each rank moves in its stages' ring all-reduces per step)."""
    p2p = 2.0 * cm.microbatches * sum(sol.stage_sent_bytes)
    per_layer = grad_bytes(cm)
    grads = max(float(per_layer[list(nodes)].sum()) for nodes in sol.nodes)
    d = cm.replicas
    return p2p, 2.0 * (d - 1) / d * grads


def why(chosen: Placement, step_ms: float, others: Sequence[tuple[Placement, float]],
        cm: CostModel, sol: Solution) -> str:
    """One line on the layout chosen: what crosses which link, against the other layout."""
    p2p, ring = traffic(cm, sol)
    text = (f"layout {chosen.name}: activations ({format_bytes(p2p)} per step) over "
            f"{chosen.p2p_link.describe()}, gradient all-reduce ({format_bytes(ring)} per "
            f"rank) over {chosen.allreduce_link.describe()}: {step_ms:.3f} ms")
    for other, other_ms in others:
        text += (f"; {other.name} (activations over {other.p2p_link.describe()}, all-reduce "
                 f"over {other.allreduce_link.describe()}): {other_ms:.3f} ms")
    if not others:
        text += "; the other layout crosses the same links"
    return text


class Placements:
    """The layouts of each (schedule, K, V, D) on the topology, computed once each; without
    a topology, one: every message and all-reduce over ``link``."""

    def __init__(self, topology: Topology | None, link: Link) -> None:
        self.topology, self.link = topology, link
        self.known: dict[tuple[str, int, int, int], list[Placement]] = {}

    def of(self, cm: CostModel) -> list[Placement]:
        key = (cm.schedule, cm.stages, cm.stages_per_rank, cm.replicas)
        if key not in self.known:
            if self.topology is None:
                self.known[key] = [Placement("replica-major", None, self.link, self.link)]
            else:
                self.known[key] = placements(self.topology, stage_ranks(cm), cm.replicas)
        return self.known[key]


def replica_problems(replicas: Sequence[int], devices: int, global_batch: int,
                     topology: Topology | None) -> list[str]:
    """What is wrong with the replicas D to try: each must split B evenly and fit the
    devices (K x D <= devices for some K >= 1)."""
    problems = []
    for d in replicas:
        if d < 1:
            problems.append(f"replicas D={d} must be at least 1 (1: one pipeline)")
        elif global_batch % d:
            problems.append(f"replicas D={d}: the global batch B={global_batch} does not split "
                            f"into {d} equal shares; give D that divide B, or another B")
        elif d > devices:
            problems.append(f"replicas D={d}: even one stage per replica needs {d} devices, "
                            f"more than the {devices} available; give D <= {devices}")
    if topology is not None and devices > topology.devices:
        problems.append(f"devices={devices} is more than the topology's {topology.devices} "
                        f"({topology.nodes} x {topology.devices_per_node})")
    return problems
