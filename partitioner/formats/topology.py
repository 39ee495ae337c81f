"""The machines a plan runs on: N nodes of G devices, one link inside a node and one between.

    >>> topo = Topology(2, 8, LINKS["nvlink"], LINKS["ib"])
    >>> topo.devices, topo.node_of(9), topo.group_link([0, 7]).describe()
    (16, 1, '450 GB/s + 0.01 ms')
    >>> topo.group_link([7, 8]).describe()               # crosses nodes: the slower link
    '50 GB/s + 0.01 ms'

Global rank g runs on node g // G (ranks fill a node before the next). A message between two
ranks crosses the intra-node link when they share a node, else the inter-node one; a group of
ranks (an all-reduce's ring, or the neighbouring stages of a pipeline) is charged the slowest
link it crosses: the lowest bandwidth and the highest latency of the links between its ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from partitioner.formats.assumptions import LINKS, Link
from partitioner.formats.checks import Problems, show
from partitioner.formats.units import MAX_MS

__all__ = ["ALLREDUCE_MODES", "MAX_NODES", "AllReduce", "Topology", "parse_topology",
           "single_node", "topology_to_json"]

#: How the gradients' all-reduce relates to the step: ``overlapped``, a stage's all-reduce
#: starts once its last backward of the step is done (while other stages still drain);
#: ``after``, every all-reduce starts once the whole pipeline's compute is done.
AllReduce = Literal["overlapped", "after"]
ALLREDUCE_MODES: tuple[str, ...] = get_args(AllReduce)
#: The most nodes and devices per node a topology may name.
MAX_NODES = 2**16


@dataclass(frozen=True)
class Topology:
    """``nodes`` x ``devices_per_node`` devices; ``intra``: the link inside a node, ``inter``:
    between nodes; ``allreduce``: whether gradient all-reduces overlap the drain."""

    nodes: int
    devices_per_node: int
    intra: Link
    inter: Link
    allreduce: AllReduce = "overlapped"

    def __post_init__(self) -> None:
        for name in ("nodes", "devices_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not \
                    1 <= value <= MAX_NODES:
                raise ValueError(f"topology {name}={value!r} must be a whole number in "
                                 f"1..{MAX_NODES}")
        if self.allreduce not in ALLREDUCE_MODES:
            raise ValueError(f"topology allreduce={self.allreduce!r} is not one of "
                             f"{', '.join(ALLREDUCE_MODES)}")

    @property
    def devices(self) -> int:
        """N x G: every device of the topology."""
        return self.nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        """The node of global rank ``rank``: ranks fill one node before the next."""
        return rank // self.devices_per_node

    def group_link(self, ranks: Iterable[int]) -> Link:
        """The slowest link a group of ranks crosses: the inter-node link (with the slower
        of the two links' figures) when they span nodes, else the intra-node one."""
        if len({self.node_of(r) for r in ranks}) <= 1:
            return self.intra
        return Link(min(self.intra.bandwidth_gbps, self.inter.bandwidth_gbps),
                    max(self.intra.latency_ms, self.inter.latency_ms))

    def layout_links(self, layout: Sequence[Sequence[int]], rank_of: Sequence[int]
                     ) -> tuple[Link, Link]:
        """(the slowest link between a replica's neighbouring stages, in any replica; the
        slowest link of any stage's all-reduce group) for ``layout[d][r]``, the global rank of
        replica d's pipeline rank r, and ``rank_of[k]``, the pipeline rank of stage k."""
        pairs = {(rank_of[k], rank_of[k + 1]) for k in range(len(rank_of) - 1)
                 if rank_of[k] != rank_of[k + 1]}
        p2p = [self.group_link((ranks[a], ranks[b])) for ranks in layout for a, b in pairs]
        groups = [self.group_link([ranks[r] for ranks in layout])
                  for r in range(len(layout[0]))]
        return self._slowest(p2p), self._slowest(groups)

    def _slowest(self, links: list[Link]) -> Link:
        if not links:
            return self.intra
        return Link(min(x.bandwidth_gbps for x in links), max(x.latency_ms for x in links))

    def describe(self) -> str:
        """``'2 nodes x 8 devices (intra 450 GB/s + 0.01 ms, inter 50 GB/s + 0.005 ms)'``."""
        return (f"{self.nodes} node{'s' if self.nodes > 1 else ''} x {self.devices_per_node} "
                f"devices (intra {self.intra.describe()}, inter {self.inter.describe()}; "
                f"all-reduce {self.allreduce})")


def single_node(devices: int, link: Link, allreduce: AllReduce = "overlapped") -> Topology:
    """One node of ``devices`` devices joined by ``link`` (what a plan assumes without a
    topology: every message, all-reduces included, over its one link)."""
    return Topology(1, max(1, devices), link, link, allreduce)


def _link_json(link: Link) -> dict[str, Any]:
    bw = link.bandwidth_gbps
    return {"bandwidth_gbps": bw if math.isfinite(bw) else "inf", "latency_ms": link.latency_ms}


def topology_to_json(topo: Topology) -> dict[str, Any]:
    """The plan's ``topology`` object."""
    return {"nodes": topo.nodes, "devices_per_node": topo.devices_per_node,
            "intra_link": _link_json(topo.intra), "inter_link": _link_json(topo.inter),
            "allreduce": topo.allreduce}


def parse_topology(raw: object, p: Problems) -> Topology | None:
    """A plan's ``topology`` object, every problem added to ``p`` (None when it has any)."""
    obj = p.mapping(raw, "topology", "nodes, devices_per_node, intra_link, inter_link, "
                                     "allreduce")
    p.keys(obj, "topology", ("nodes", "devices_per_node", "intra_link", "inter_link",
                             "allreduce"), required=("nodes", "devices_per_node"))
    before = len(p)
    nodes = p.whole(obj.get("nodes", 1), "topology.nodes", low=1, high=MAX_NODES)
    per_node = p.whole(obj.get("devices_per_node", 1), "topology.devices_per_node", low=1,
                       high=MAX_NODES)
    links = []
    for key, default in (("intra_link", LINKS["free"]), ("inter_link", LINKS["free"])):
        link = p.mapping(obj.get(key, {}), f"topology.{key}", "bandwidth_gbps, latency_ms")
        p.keys(link, f"topology.{key}", ("bandwidth_gbps", "latency_ms"))
        bw = p.number(link.get("bandwidth_gbps", "inf"), f"topology.{key}.bandwidth_gbps",
                      inf_ok=True, default=math.inf)
        lat = p.number(link.get("latency_ms", 0.0), f"topology.{key}.latency_ms", high=MAX_MS)
        try:
            links.append(Link(bw, lat))
        except ValueError as exc:
            p.add(f"topology.{key}", str(exc))
            links.append(default)
    mode = obj.get("allreduce", "overlapped")
    if mode not in ALLREDUCE_MODES:
        p.add("topology.allreduce", f"{show(mode)} is not one of {', '.join(ALLREDUCE_MODES)}")
    if len(p) > before:
        return None
    return Topology(nodes, per_node, links[0], links[1], mode)

