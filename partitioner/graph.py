"""Layer graphs: the DAG of a profile, and the exact costs of assigning its layers to stages.

    >>> from partitioner import CostModel, load_profile
    >>> cm = CostModel(load_profile("pipedream/resnet18"), 4, 4, stages=2)
    >>> sol = evaluate_assignment(cm, [0] * 35 + [1] * 35)
    >>> [len(n) for n in sol.nodes], round(sol.bottleneck_ms, 1)
    ([35, 35], 189.4)

A profile without ``edges`` is the chain i -> i+1. A stage is a set of layers, and an
assignment is *convex* when no edge goes from a later stage to an earlier one (for every edge
u -> v, stage(u) <= stage(v)); on a chain that means contiguous ranges.

Costs per micro-batch, the chain cost model of ``CostModel`` extended edge by edge:

- compute of stage k: sum over its layers of fwd + bwd (+ fwd again when k recomputes);
- communication: a layer u whose output feeds layers in D(u) = {stages of its successors}
  minus its own stage sends that output once per destination stage (point to point, also when
  the destination is several stages ahead), each ``link.transfer_ms(out_bytes[u])``: the sender
  pays every forward transfer and each receiving stage pays one gradient transfer back;
- memory: training state + activations; a recomputing stage stashes, per micro-batch in
  flight, the outputs of the layers outside it that feed it (once per source) plus the
  ``in_bytes`` of its layers that have no predecessor (the model's inputs).

On a chain whose ``in_bytes[i] == out_bytes[i-1]`` (as the profilers write them) these are
exactly ``CostModel.stage_compute_ms + stage_comm_ms`` and ``stage_memory_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx

from .costs import CostModel
from .profile import Profile

__all__ = ["GraphSolution", "assignment_problems", "evaluate_assignment", "layer_edges",
           "layer_graph", "reach_counts", "stage_of_nodes"]


def layer_edges(profile: Profile) -> tuple[tuple[int, int], ...]:
    """The profile's edges, or the chain (i, i+1) when it has none.

        >>> from partitioner import load_profile
        >>> layer_edges(load_profile("h200/gpt2-medium"))[:2], len(layer_edges(load_profile(
        ...     "pipedream/resnet18")))
        (((0, 1), (1, 2)), 78)
    """
    if profile.edges is not None:
        return profile.edges
    return tuple((i, i + 1) for i in range(profile.num_layers - 1))


def layer_graph(profile: Profile) -> nx.DiGraph:
    """The networkx DAG of the layers (nodes 0..L-1, with ``name`` and ``type`` attributes)."""
    graph = nx.DiGraph()
    for i, lay in enumerate(profile.layers):
        graph.add_node(i, name=lay.name, type=lay.type)
    graph.add_edges_from(layer_edges(profile))
    return graph


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


@dataclass(frozen=True)
class GraphSolution:
    """A partition of a layer graph into stages, with its per-stage figures (per micro-batch).

    ``status`` says where it came from: ``evaluated`` (given by hand), ``optimal`` or
    ``feasible`` (the ILP; then ``lower_bound_ms`` is a proven lower bound on the best
    bottleneck, already net of ``rounding_error_ms``, the bound on what the ILP's integer
    scaling of times can change a stage's time by).
    """

    nodes: tuple[tuple[int, ...], ...]  # stage k's layers, sorted
    stage_compute_ms: tuple[float, ...]
    stage_comm_ms: tuple[float, ...]
    stage_memory_bytes: tuple[float, ...]
    stage_sent_bytes: tuple[float, ...]  # bytes stage k sends forward, summed over destinations
    status: str = "evaluated"
    lower_bound_ms: float = 0.0
    rounding_error_ms: float = 0.0
    time_limit_s: float | None = None
    solve_s: float = 0.0

    @property
    def stage_ms(self) -> tuple[float, ...]:
        return tuple(c + m for c, m in zip(self.stage_compute_ms, self.stage_comm_ms,
                                           strict=True))

    @property
    def bottleneck_ms(self) -> float:
        return max(self.stage_ms)

    @property
    def gap(self) -> float:
        """Relative distance to the proven lower bound: 0 when optimal (up to rounding)."""
        top = self.bottleneck_ms
        return max(0.0, top - self.lower_bound_ms) / top if top > 0 else 0.0

    @property
    def stage_of(self) -> tuple[int, ...]:
        return stage_of_nodes(self.nodes)

    @property
    def is_chain(self) -> bool:
        """Whether every stage is a contiguous layer range in layer order."""
        return all(n[-1] - n[0] + 1 == len(n) for n in self.nodes)


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

        >>> assignment_problems(3, [(0, 1), (1, 2)], [0, 1, 0], 2)
        ['edge 1 -> 2 goes from stage 1 back to stage 0; stages must be convex (stage(src) <= stage(dst))']
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


def evaluate_assignment(cm: CostModel, stage_of: Sequence[int]) -> GraphSolution:
    """The per-stage compute, communication and memory of an assignment (``stage_of[i]`` =
    stage of layer i, K = ``cm.stages``), straight from the cost model's per-layer arrays.
    Raises ValueError listing every problem unless the assignment is a convex partition."""
    prof, big_k = cm.profile, cm.stages
    edges = layer_edges(prof)
    problems = assignment_problems(prof.num_layers, edges, stage_of, big_k)
    if problems:
        raise ValueError("not a convex partition into K=" + str(big_k) + " stages:\n  "
                         + "\n  ".join(problems))
    fwd, bwd = cm.layer_array("fwd_ms"), cm.layer_array("bwd_ms")
    saved, out = cm.layer_array("saved_bytes"), cm.layer_array("out_bytes")
    inputs, state = cm.layer_array("in_bytes"), cm.param_state_bytes()
    compute = [2 * cm.runtime.action_ms] * big_k  # the runtime's cost of each stage's F and B
    comm = [0.0] * big_k
    state_k, saved_k, stash_k, sent_k = [0.0] * big_k, [0.0] * big_k, [0.0] * big_k, [0.0] * big_k
    for i, k in enumerate(stage_of):
        compute[k] += float(fwd[i] + bwd[i]) + (float(fwd[i]) if cm.recomputes(k) else 0.0)
        state_k[k] += float(state[i])
        saved_k[k] += float(saved[i])
    destinations: dict[int, set[int]] = {}
    has_pred = [False] * prof.num_layers
    for u, v in edges:
        has_pred[v] = True
        if stage_of[v] != stage_of[u]:
            destinations.setdefault(u, set()).add(stage_of[v])
    for i, k in enumerate(stage_of):
        if not has_pred[i]:
            stash_k[k] += float(inputs[i])
    for u, dests in destinations.items():
        transfer = cm.link.transfer_ms(float(out[u]))
        for d in dests:
            comm[stage_of[u]] += transfer  # the forward send
            comm[d] += transfer  # the gradient sent back
            sent_k[stage_of[u]] += float(out[u])
            stash_k[d] += float(out[u])
    memory = []
    for k in range(big_k):
        held = cm.in_flight(k)
        acts = held * stash_k[k] + saved_k[k] if cm.recomputes(k) else held * saved_k[k]
        memory.append(state_k[k] + acts)
    nodes = tuple(tuple(i for i, s in enumerate(stage_of) if s == k) for k in range(big_k))
    return GraphSolution(nodes, tuple(compute), tuple(comm), tuple(memory), tuple(sent_k))
