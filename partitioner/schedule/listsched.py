"""The list scheduler: builds a schedule by replaying time, one ready action at a time per rank.

    >>> sched = list_schedule(Costs.uniform(2, 1), placement=(0, 1), microbatches=2, caps=(2, 2))
    >>> str(sched)
    '0: 0F0 0F1 0I0 0W0 0I1 0W1\\n1: 1F0 1I0 1F1 1I1 1W0 1W1'

Each rank, whenever it is free, runs the action that is ready soonest; among actions ready at
the same time an input gradient (I, or a full B) comes first (it is on the critical path: an
earlier stage waits for it), then a forward (the deepest stage's first, so that the pipeline
fills towards its end), then a weight gradient (W: it waits for nobody, so it fills what would
otherwise be idle time). A stage starts the forward of a new micro-batch only while fewer than
``caps[k]`` of its micro-batches are in flight (forward run, weight gradient not yet), which
bounds its activation memory; the last stage's micro-batches always drain, so the replay never
deadlocks. Times are in any unit (``Costs``), communication included; ``zbv`` uses unit times,
``synthesis.synthesise`` measured ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from partitioner.schedule.ir import Action, Schedule

__all__ = ["Costs", "list_schedule"]


@dataclass(frozen=True)
class Costs:
    """Per stage k: forward, input-gradient and weight-gradient time of one micro-batch, and the
    time a message takes to reach stage k+1 (forward) or k-1 (gradient) from stage k; ``split``
    False runs full backwards B taking ``input_ms + weight_ms``."""

    fwd_ms: tuple[float, ...]
    input_ms: tuple[float, ...]
    weight_ms: tuple[float, ...]
    send_f_ms: tuple[float, ...]
    send_b_ms: tuple[float, ...]
    split: bool = True

    @staticmethod
    def uniform(stages: int, unit: float = 1.0, split: bool = True) -> Costs:
        """F = I = W = ``unit`` on every stage, free links."""
        same = (unit,) * stages
        zero = (0.0,) * stages
        return Costs(same, same, same, zero, zero, split)

    @property
    def stages(self) -> int:
        return len(self.fwd_ms)


def list_schedule(costs: Costs, placement: Sequence[int], microbatches: int,
                  caps: Sequence[int], name: str = "listed", priority: str = "IFW",
                  deep_inputs_first: bool = False) -> Schedule:
    """The schedule the replay above builds for K = ``costs.stages`` stages on the ranks of
    ``placement`` (stage k on rank ``placement[k]``), M micro-batches, at most ``caps[k]``
    micro-batches in flight on stage k (each cap >= 1). ``priority`` orders the kinds among
    actions ready at the same time (default input gradients, forwards, weight gradients);
    forwards go deepest stage first, input gradients shallowest first unless
    ``deep_inputs_first``."""
    if sorted(priority) != ["F", "I", "W"]:
        raise ValueError(f"priority {priority!r} must order the kinds I, F and W, e.g. 'IFW'")
    rank_i, rank_f, rank_w = (priority.index(c) for c in "IFW")
    big_k, m = costs.stages, microbatches
    if len(placement) != big_k or len(caps) != big_k or min(caps, default=1) < 1 or m < 1:
        raise ValueError(f"list_schedule needs one rank and one cap >= 1 per stage and M >= 1; "
                         f"got K={big_k}, placement {list(placement)}, caps {list(caps)}, M={m}")
    ranks = max(placement) + 1
    on_rank = [[k for k in range(big_k) if placement[k] == r] for r in range(ranks)]
    free = [0.0] * ranks
    n_f, n_i, n_w = [0] * big_k, [0] * big_k, [0] * big_k
    f_end: dict[tuple[int, int], float] = {}  # (k, i): when F(k, i)'s output reached k+1
    i_end: dict[tuple[int, int], float] = {}  # (k, i): when its gradient reached k-1
    rows: list[list[Action]] = [[] for _ in range(ranks)]
    last = big_k - 1
    grad_kind = "I" if costs.split else "B"
    for _ in range(big_k * m * (3 if costs.split else 2)):
        best: tuple[float, int, int, int, int] | None = None  # (start, rank, rule, k, kind)
        for r in range(ranks):
            for k in on_rank[r]:
                options = []
                if n_i[k] < n_f[k]:
                    ready = i_end.get((k + 1, n_i[k])) if k < last else f_end[k, n_i[k]]
                    if ready is not None:
                        options.append((ready, rank_i, -k if deep_inputs_first else k, 1))
                if n_f[k] < m and n_f[k] - n_w[k] < caps[k]:
                    ready = f_end.get((k - 1, n_f[k])) if k > 0 else 0.0
                    if ready is not None:
                        options.append((ready, rank_f, -k, 0))
                if costs.split and n_w[k] < n_i[k]:
                    options.append((0.0, rank_w, k, 2))
                for ready, rule, order, kind in options:
                    key = (max(free[r], ready), rule, order, r, kind)
                    cand = (key[0], r, rule * 10**6 + order, k, kind)
                    if best is None or (cand[0], cand[2], r) < (best[0], best[2], best[1]):
                        best = cand
        assert best is not None, "the list scheduler found nothing to run"  # see docstring
        start, r, _, k, kind = best
        if kind == 0:
            end = start + costs.fwd_ms[k]
            f_end[k, n_f[k]] = end + (costs.send_f_ms[k] if _other_rank(placement, k, k + 1)
                                      else 0.0)
            rows[r].append(Action("F", k, n_f[k]))
            n_f[k] += 1
        elif kind == 1:
            end = start + costs.input_ms[k] + (0.0 if costs.split else costs.weight_ms[k])
            i_end[k, n_i[k]] = end + (costs.send_b_ms[k] if _other_rank(placement, k, k - 1)
                                      else 0.0)
            rows[r].append(Action(grad_kind, k, n_i[k]))  # type: ignore[arg-type]
            n_i[k] += 1
            if not costs.split:
                n_w[k] += 1
        else:
            end = start + costs.weight_ms[k]
            rows[r].append(Action("W", k, n_w[k]))
            n_w[k] += 1
        free[r] = end
    identity = tuple(placement) == tuple(range(big_k))
    return Schedule(name, big_k, m, tuple(map(tuple, rows)), () if identity else tuple(placement))


def _other_rank(placement: Sequence[int], k: int, peer: int) -> bool:
    """Whether a message from stage k to ``peer`` crosses ranks (one within a rank is free)."""
    return 0 <= peer < len(placement) and placement[peer] != placement[k]
