"""Data-parallel replicas in a plan: D copies of the pipeline and the global rank of each part.

    >>> default_layout(pipeline_ranks=2, replicas=3)   # layout[d][r]: replica d, rank r
    ((0, 1), (2, 3), (4, 5))
    >>> position(default_layout(2, 3), 3)              # global rank 3: replica 1, rank 1
    (1, 1)

A plan with ``"replicas": D`` runs D copies of its pipeline of R ranks (R = K / V: its stages,
V per rank) on R x D global ranks. The global batch B splits into D equal shares, replica d
taking samples [d B/D, (d+1) B/D), each share into the plan's M micro-batches; after the
step each stage's gradients are summed over its D copies (every replica's loss is weighted
by its share of B, so the sum is the gradient of the whole batch). ``"layout"`` lists, per
replica, the global rank of each of its pipeline ranks; without it replica d's ranks are
d R .. d R + R - 1 (a replica's neighbouring stages on neighbouring ranks, so on one node
where a node holds a whole pipeline). Older plans have neither field: D = 1.
"""

from __future__ import annotations

from typing import Any

from partitioner.formats.checks import Problems, show

__all__ = ["MAX_REPLICAS", "default_layout", "parse_replica_fields", "position",
           "replica_fields"]

#: The most replicas a plan may name.
MAX_REPLICAS = 2**16

Layout = tuple[tuple[int, ...], ...]


def default_layout(pipeline_ranks: int, replicas: int) -> Layout:
    """Replica d's pipeline rank r on global rank d x R + r."""
    return tuple(tuple(d * pipeline_ranks + r for r in range(pipeline_ranks))
                 for d in range(replicas))


def position(layout: Layout, global_rank: int) -> tuple[int, int]:
    """(replica, pipeline rank) of ``global_rank`` in ``layout``; ValueError if it has none."""
    for d, ranks in enumerate(layout):
        if global_rank in ranks:
            return d, ranks.index(global_rank)
    world = sum(len(r) for r in layout)
    raise ValueError(f"global rank {global_rank} is not in the plan's layout of {world} ranks "
                     f"(0..{world - 1}); launch exactly {world} ranks for this plan")


def replica_fields(replicas: int, layout: Layout | None) -> dict[str, Any]:
    """The JSON fields of the replicas (none for one replica in the default layout)."""
    out: dict[str, Any] = {}
    if replicas != 1:
        out["replicas"] = replicas
    if layout is not None:
        out["layout"] = [list(ranks) for ranks in layout]
    return out


def parse_replica_fields(data: dict[str, Any], pipeline_ranks: int, global_batch: int,
                         microbatches: int, p: Problems) -> tuple[int, Layout | None]:
    """(D, layout or None for the default) from a plan's JSON, every problem added to ``p``."""
    d = p.whole(data.get("replicas", 1), "replicas", low=1, high=MAX_REPLICAS)
    if d > 1 and global_batch % d:
        p.add("replicas", f"global_batch {global_batch} does not split into {d} equal shares; "
                          f"choose a global batch that is a multiple of {d}, or other replicas")
    elif d > 1 and global_batch // d < microbatches:
        p.add("replicas", f"each of the {d} replicas gets {global_batch // d} samples, fewer "
                          f"than microbatches {microbatches}; each micro-batch needs a sample: "
                          f"use fewer micro-batches or replicas")
    raw = data.get("layout")
    if raw is None:
        return d, None
    world = d * pipeline_ranks
    rows = raw if isinstance(raw, list) else None
    if rows is None or len(rows) != d or not all(
            isinstance(r, list) and len(r) == pipeline_ranks
            and all(isinstance(g, int) and not isinstance(g, bool) for g in r) for r in rows):
        p.add("layout", f"{show(raw)} is not {d} lists (one per replica) of {pipeline_ranks} "
                        f"global ranks (one per pipeline rank)")
        return d, None
    flat = sorted(g for r in rows for g in r)
    if flat != list(range(world)):
        p.add("layout", f"lists the global ranks {flat[:16]}{' ...' if world > 16 else ''}; it "
                        f"must hold each of 0..{world - 1} exactly once")
        return d, None
    return d, tuple(tuple(r) for r in rows)
