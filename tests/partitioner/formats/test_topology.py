"""Topologies: which link a group of ranks crosses, and the plan's JSON of them."""

from __future__ import annotations

import pytest

from partitioner.formats.assumptions import LINKS, Link
from partitioner.formats.checks import Problems
from partitioner.formats.topology import Topology, parse_topology, topology_to_json


def test_group_link_is_the_slowest_crossed() -> None:
    topo = Topology(2, 4, Link(400.0, 0.001), Link(20.0, 0.01))
    assert topo.devices == 8
    assert topo.group_link([0, 1, 2, 3]) == Link(400.0, 0.001)
    assert topo.group_link([3, 4]) == Link(20.0, 0.01)
    odd = Topology(2, 4, Link(10.0, 0.02), Link(20.0, 0.01))  # a slow node, a fast network
    assert odd.group_link([0, 5]) == Link(10.0, 0.02)


def test_round_trip_and_problems() -> None:
    topo = Topology(8, 8, LINKS["nvlink"], LINKS["ib"], "after")
    p = Problems()
    assert parse_topology(topology_to_json(topo), p) == topo and not p
    bad = Problems()
    assert parse_topology({"nodes": 0, "devices_per_node": 8, "allreduce": "never"}, bad) is None
    assert any("topology.nodes" in x for x in bad)
    assert any("topology.allreduce" in x and "overlapped" in x for x in bad)


def test_bad_topology_is_refused() -> None:
    with pytest.raises(ValueError, match="nodes=0 must be a whole number"):
        Topology(0, 8, LINKS["nvlink"], LINKS["ib"])
