"""The list scheduler's rule, replayed the plain way (every stage scanned at every step): the
oracle ``partitioner.schedule.listsched.replay``, which refreshes only what changed, must equal."""

from collections.abc import Sequence

from partitioner.schedule.ir import Action
from partitioner.schedule.listsched import Costs


def reference_rows(costs: Costs, placement: Sequence[int], microbatches: int,
                   caps: Sequence[int], priority: str = "IFW",
                   deep_inputs_first: bool = False) -> tuple[list[list[Action]], float]:
    """Each rank's actions in order, and the step."""
    rule = {c: priority.index(c) for c in "IFW"}
    big_k, m = costs.stages, microbatches
    ranks = max(placement) + 1
    on_rank = [[k for k in range(big_k) if placement[k] == r] for r in range(ranks)]
    free = [0.0] * ranks
    done = {"F": [0] * big_k, "I": [0] * big_k, "W": [0] * big_k}
    arrived: dict[tuple[str, int, int], float] = {}  # (F|I, k, i): k's output of i is there
    rows: list[list[Action]] = [[] for _ in range(ranks)]
    last = big_k - 1
    send = {"F": (costs.send_f_ms, 1), "I": (costs.send_b_ms, -1)}
    for _ in range(big_k * m * (3 if costs.split else 2)):
        best: tuple[float, int, int, int, str] | None = None  # (start, rule, order, k, kind)
        for r in range(ranks):
            for k in on_rank[r]:
                n_f, n_i, n_w = done["F"][k], done["I"][k], done["W"][k]
                options: list[tuple[float | None, str, int]] = []
                if n_i < n_f:
                    options.append((arrived.get(("I", k + 1, n_i)) if k < last else
                                    arrived["F", k, n_i], "I", -k if deep_inputs_first else k))
                if n_f < m and n_f - n_w < caps[k]:
                    options.append((arrived.get(("F", k - 1, n_f)) if k > 0 else 0.0, "F", -k))
                if costs.split and n_w < n_i:
                    options.append((0.0, "W", k))
                for ready, kind, order in options:
                    if ready is None:
                        continue
                    cand = (max(free[r], ready), rule[kind], order, k, kind)
                    if best is None or cand[:3] < best[:3]:
                        best = cand
        assert best is not None, "the list scheduler found nothing to run"  # see docstring
        start, _, _, k, kind = best
        r, i = placement[k], done[kind][k]
        if kind == "F":
            end = start + costs.fwd_ms[k]
        elif kind == "I":
            end = start + costs.input_ms[k] + (0.0 if costs.split else costs.weight_ms[k])
        else:
            end = start + costs.weight_ms[k]
        if kind in send:
            times, step = send[kind]
            if 0 <= k + step < big_k and placement[k + step] != r:
                end += times[k]
            arrived[kind, k, i] = end
        done[kind][k] += 1
        if kind == "I" and not costs.split:
            done["W"][k] += 1
        written = kind if costs.split or kind != "I" else "B"
        rows[r].append(Action(written, k, i))  # type: ignore[arg-type]
        free[r] = end
    return rows, max(free)
