"""The splits other tools make by default, to measure the exact partition against.

    >>> equal_layers(10, 3)
    [0, 3, 7, 10]
    >>> balanced_weights([4, 1, 1, 1, 1], 2)
    [0, 1, 5]
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np

__all__ = ["balanced_weights", "equal_layers"]


def equal_layers(num_layers: int, stages: int) -> list[int]:
    """Cut points giving every stage the same number of layers (the remainder spread evenly),
    as torch.distributed.pipelining users and DeepSpeed's ``uniform`` method do."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"K={stages} stages must be between 1 and L={num_layers} layers")
    return [round(k * num_layers / stages) for k in range(stages + 1)]


def balanced_weights(weights: Sequence[float], stages: int) -> list[int]:
    """Cut points minimising the largest per-stage sum of ``weights`` (e.g. parameter counts, as
    DeepSpeed's default ``parameters`` method balances). Greedy packing decides whether a bound
    fits; bisection over the achieved bounds finds the smallest."""
    w = np.asarray(weights, dtype=np.float64)
    if not 1 <= stages <= len(w):
        raise ValueError(f"K={stages} stages must be between 1 and L={len(w)} layers")
    prefix = np.concatenate(([0.0], np.cumsum(w)))

    def pack(bound: float) -> list[int] | None:
        cuts = [0]
        for k in range(stages - 1):
            # furthest end within the bound, leaving a layer for every later stage
            end = int(np.searchsorted(prefix, prefix[cuts[-1]] + bound, side="right")) - 1
            end = min(max(end, cuts[-1] + 1), len(w) - (stages - 1 - k))
            if prefix[end] - prefix[cuts[-1]] > bound and end > cuts[-1] + 1:
                return None
            cuts.append(end)
        if prefix[-1] - prefix[cuts[-1]] > bound:
            return None
        return [*cuts, len(w)]

    lo, hi = max(float(w.max(initial=0.0)), float(prefix[-1]) / stages), float(prefix[-1])
    best = pack(hi)
    assert best is not None
    while hi - lo > 1e-9 * max(hi, 1.0):
        mid = 0.5 * (lo + hi)
        cuts = pack(mid)
        if cuts is None:
            lo = mid
        else:
            best, hi = cuts, float(max(prefix[b] - prefix[a] for a, b in pairwise(cuts)))
    return best
