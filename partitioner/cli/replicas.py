"""Options for data-parallel replicas and the topology: ``--replicas``, ``--nodes``, the links.

    $ partition-model --profile h200/gpt-1.3b -K 8 -M 8 -B 512 --replicas 8 \\
          --nodes 8 --devices-per-node 8 --intra-link nvlink --inter-link ib

Without ``--nodes`` / ``--devices-per-node`` a plan with D > 1 assumes one node whose link
(``--link``, ``--bandwidth``, ``--latency-ms``) carries the activations and the all-reduce
alike; with them, ``--intra-link`` (default: ``--link``'s) joins a node's devices and
``--inter-link`` (default ``ib``) the nodes, each overridable (``--intra-bandwidth``,
``--inter-latency-ms``, ...).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from partitioner.cli.main import CliError
from partitioner.cli.options import bandwidth, count, link_from_args, milliseconds
from partitioner.cost.model import CostModel
from partitioner.formats.assumptions import LINKS, Link
from partitioner.formats.plan_replicas import MAX_REPLICAS
from partitioner.formats.profile import Profile
from partitioner.formats.topology import ALLREDUCE_MODES, MAX_NODES, Topology

__all__ = ["add_replica_arguments", "replicas_type", "replicated", "topology_from_args"]


def replicas_type(text: str) -> list[int]:
    """An argparse type: D, or several (1,2,4), each a whole number >= 1."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = sorted({int(t) for t in parts})
    except ValueError:
        values = []
    if not values or not all(1 <= d <= MAX_REPLICAS for d in values):
        raise argparse.ArgumentTypeError(
            f"--replicas {text!r} must be whole numbers in 1..{MAX_REPLICAS} (the copies of "
            f"the pipeline; 1: no data parallelism), e.g. --replicas 8")
    return values


def add_replica_arguments(p: argparse.ArgumentParser, search: bool = False) -> None:
    """``--replicas``, ``--shard-optimizer``, ``--allreduce`` and the topology's options."""
    p.add_argument("--replicas", "-D", type=replicas_type, default=None, metavar="D",
                   help=("replicas to try, e.g. 1,2,4,8 (default: 1, or with --nodes every D "
                         "that divides B)" if search else
                         "data-parallel copies of the pipeline (default 1); each takes B/D "
                         "samples in M micro-batches"))
    p.add_argument("--shard-optimizer", action="store_true",
                   help="ZeRO-1: each replica keeps 1/D of its stages' optimizer state")
    p.add_argument("--allreduce", choices=ALLREDUCE_MODES, default="overlapped",
                   help="the gradients' all-reduce starts at a stage's last backward "
                        "(overlapped, default) or after the pipeline's compute")
    p.add_argument("--nodes", type=count("--nodes", high=MAX_NODES), default=None,
                   metavar="N", help="nodes of the topology (with --devices-per-node)")
    p.add_argument("--devices-per-node", type=count("--devices-per-node", high=MAX_NODES),
                   default=None, metavar="G", help="devices per node")
    for where, default in (("intra", "--link's"), ("inter", "ib")):
        p.add_argument(f"--{where}-link", choices=sorted(LINKS), default=None,
                       help=f"link preset {'inside a node' if where == 'intra' else 'between nodes'}"
                            f" (default: {default})")
        p.add_argument(f"--{where}-bandwidth", type=bandwidth, default=None, metavar="GBPS",
                       help=f"{where}-node bandwidth in GB/s (overrides --{where}-link)")
        p.add_argument(f"--{where}-latency-ms", type=milliseconds(f"--{where}-latency-ms"),
                       default=None, metavar="MS",
                       help=f"{where}-node latency per message (overrides --{where}-link)")


def _link(args: argparse.Namespace, where: str, base: Link) -> Link:
    preset = LINKS[getattr(args, f"{where}_link")] if getattr(args, f"{where}_link") else base
    bw = getattr(args, f"{where}_bandwidth")
    lat = getattr(args, f"{where}_latency_ms")
    return Link(preset.bandwidth_gbps if bw is None else bw,
                preset.latency_ms if lat is None else lat)


def topology_from_args(args: argparse.Namespace, profile: Profile) -> Topology | None:
    """The topology ``--nodes`` and ``--devices-per-node`` give (both or neither), with its
    links; None without them."""
    given = (args.nodes is not None, args.devices_per_node is not None)
    if given == (False, False):
        extra = [f"--{w}-{x}" for w in ("intra", "inter") for x in ("link", "bandwidth",
                                                                   "latency-ms")
                 if getattr(args, f"{w}_{x.replace('-', '_')}") is not None]
        if extra:
            raise CliError(f"{', '.join(extra)} describe a topology's links: give the "
                           f"topology too, e.g. --nodes 2 --devices-per-node 8")
        return None
    if given != (True, True):
        raise CliError("--nodes N and --devices-per-node G go together (N x G devices): "
                       "give both, e.g. --nodes 2 --devices-per-node 8")
    intra = _link(args, "intra", link_from_args(args, profile))
    inter = _link(args, "inter", LINKS["ib"])
    return Topology(args.nodes, args.devices_per_node, intra, inter, args.allreduce)


def replicated(cm: CostModel, args: argparse.Namespace, topology: Topology | None
               ) -> tuple[CostModel, Topology | None]:
    """``cm`` with ``--replicas`` (one D), ``--shard-optimizer`` and ``--allreduce``, and the
    topology to plan on: the given one, or for D > 1 one node of R x D devices on ``cm``'s
    link. Errors name the value, the rule and the fix."""
    ds = args.replicas or [1]
    if len(ds) > 1:
        raise CliError(f"--replicas {','.join(map(str, ds))}: a plan has one D; give one, "
                       f"or let `partition-model search` try several")
    d = ds[0]
    if cm.global_batch % d:
        raise CliError(f"--replicas {d}: the global batch B={cm.global_batch} does not split "
                       f"into {d} equal shares; give a B that is a multiple of {d} "
                       f"(e.g. -B {cm.global_batch // d * d or d}) or replicas that divide it")
    if cm.global_batch // d < cm.microbatches:
        raise CliError(f"--replicas {d}: each replica gets B/D={cm.global_batch // d} samples, "
                       f"fewer than M={cm.microbatches} micro-batches; use -M <= "
                       f"{cm.global_batch // d}, fewer replicas or a larger batch")
    ranks = cm.stages // cm.stages_per_rank
    if topology is not None and ranks * d > topology.devices:
        raise CliError(f"K={cm.stages} stages on R={ranks} ranks x D={d} replicas need "
                       f"{ranks * d} devices, more than the {topology.devices} of --nodes "
                       f"{topology.nodes} --devices-per-node {topology.devices_per_node}; "
                       f"use fewer stages or replicas, or more nodes")
    cm = replace(cm, replicas=d, shard_optimizer=args.shard_optimizer,
                 allreduce=args.allreduce, allreduce_link=cm.link)
    if topology is None and d > 1:
        topology = Topology(1, ranks * d, cm.link, cm.link, args.allreduce)
    return cm, topology
