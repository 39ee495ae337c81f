"""The layer graph a profile describes, and what a valid partition of it into stages is.

    >>> from partitioner import load_profile
    >>> layer_edges(load_profile("h200/gpt2-medium"))[:2]
    ((0, 1), (1, 2))
    >>> assignment_problems(3, [(0, 1), (1, 2)], [0, 1, 0], 2)
    ['edge 1 -> 2 goes from stage 1 back to stage 0; stages must be convex (stage(src) <= stage(dst))']

A profile without ``edges`` is the chain i -> i+1. A stage is a set of layers, and an
assignment is *convex* when no edge goes from a later stage to an earlier one (for every edge
u -> v, stage(u) <= stage(v)); on a chain that means contiguous ranges in layer order.
"""

from __future__ import annotations

from collections.abc import Sequence

from partitioner.formats.profile import Profile

__all__ = ["assignment_problems", "layer_edges", "range_problems", "reach_counts",
           "stage_of_nodes"]


def layer_edges(profile: Profile) -> tuple[tuple[int, int], ...]:
    """The profile's edges, or the chain (i, i+1) when it has none.

        >>> from partitioner import load_profile
        >>> len(layer_edges(load_profile("pipedream/resnet18")))
        78
    """
    if profile.edges is not None:
        return profile.edges
    return tuple((i, i + 1) for i in range(profile.num_layers - 1))


def reach_counts(num_layers: int, edges: Sequence[tuple[int, int]]) -> tuple[list[int],
                                                                              list[int]]:
    """Number of ancestors and of descendants of every layer (edges go from lower to higher
    indices, so one pass each way over bitsets suffices).

        >>> reach_counts(4, [(0, 1), (0, 2), (1, 3), (2, 3)])
        ([0, 1, 1, 3], [3, 1, 1, 0])
    """
    succ: list[list[int]] = [[] for _ in range(num_layers)]
    for u, v in edges:
        succ[u].append(v)
    desc = [0] * num_layers
    for u in range(num_layers - 1, -1, -1):
        for v in succ[u]:
            desc[u] |= desc[v] | (1 << v)
    anc = [0] * num_layers
    for u in range(num_layers):
        for v in succ[u]:
            anc[v] |= anc[u] | (1 << u)
    return [bin(a).count("1") for a in anc], [bin(d).count("1") for d in desc]


def stage_of_nodes(nodes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The stage of each layer from per-stage node lists (which must cover 0..L-1 once each).

        >>> stage_of_nodes([(0, 2), (1, 3)])
        (0, 1, 0, 1)
    """
    total = sum(len(n) for n in nodes)
    out = [-1] * total
    for k, members in enumerate(nodes):
        for i in members:
            if not 0 <= i < total or out[i] != -1:
                raise ValueError(f"layer {i} of stage {k} is out of range 0..{total - 1} or "
                                 f"listed twice; every layer must be in exactly one stage")
            out[i] = k
    return tuple(out)


def assignment_problems(num_layers: int, edges: Sequence[tuple[int, int]],
                        stage_of: Sequence[int], stages: int) -> list[str]:
    """Every reason why ``stage_of`` is not a convex partition into ``stages`` non-empty
    stages (empty list: it is one).

        >>> assignment_problems(2, [(0, 1)], [0, 1], 2)
        []
    """
    problems = []
    if len(stage_of) != num_layers:
        return [f"{len(stage_of)} stage numbers given for {num_layers} layers; give one each"]
    bad = [i for i, k in enumerate(stage_of) if not 0 <= k < stages]
    if bad:
        problems.append(f"layers {bad[:10]} have stage numbers outside 0..{stages - 1}")
    empty = sorted(set(range(stages)) - set(stage_of))
    if empty:
        problems.append(f"stages {empty} are empty; every stage needs at least one layer")
    for u, v in edges:
        if stage_of[u] > stage_of[v]:
            problems.append(f"edge {u} -> {v} goes from stage {stage_of[u]} back to stage "
                            f"{stage_of[v]}; stages must be convex (stage(src) <= stage(dst))")
    return problems


def range_problems(ranges: Sequence[tuple[int, int]], num_layers: int) -> list[str]:
    """Every reason why ``ranges`` (stage k: layers [start, end)) do not cover layers
    0..L-1 exactly once, in pipeline order, each stage non-empty (empty list: they do).

        >>> range_problems([(0, 26), (2, 25)], 26)
        ['stage 1 holds layers [2, 25) but stage 0 ends at layer 26; stages must follow each other without overlap or gap', 'the stages end at layer 25 but the model has 26 layers; the last stage must end at 26']
    """
    problems = []
    expect = 0
    for k, (start, end) in enumerate(ranges):
        if end <= start:
            problems.append(f"stage {k} holds layers [{start}, {end}), which is empty; every "
                            f"stage needs at least one layer")
        if start != expect:
            where = "the model starts at layer 0" if k == 0 else f"stage {k - 1} ends at layer {expect}"
            problems.append(f"stage {k} holds layers [{start}, {end}) but {where}; stages must "
                            f"follow each other without overlap or gap")
        expect = end
    if not ranges:
        problems.append("there are no stages; give at least one")
    elif expect != num_layers:
        problems.append(f"the stages end at layer {expect} but the model has {num_layers} "
                        f"layers; the last stage must end at {num_layers}")
    return problems
