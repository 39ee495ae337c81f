"""A derivative-free minimiser for the few figures the device models fit.

    >>> x = nelder_mead(lambda v: float(((v - np.array([1.0, -2.0])) ** 2).sum()),
    ...                 np.zeros(2), np.ones(2), 400)
    >>> np.round(x, 3).tolist()
    [1.0, -2.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from partitioner.cost.sizes import FloatArray

__all__ = ["minimise_within", "nelder_mead"]

def nelder_mead(f: Callable[[FloatArray], float], x0: FloatArray, step: FloatArray,
                 evals: int) -> FloatArray:
    """Minimise f from x0 (the standard reflection 1, expansion 2, contraction and shrink 1/2),
    within ``evals`` evaluations or until the simplex's values agree to 1e-9."""
    n = len(x0)
    pts = [x0] + [x0 + np.eye(n)[j] * step[j] for j in range(n)]
    vals = [f(p) for p in pts]
    used = n + 1
    while used < evals:
        order = np.argsort(vals)
        pts, vals = [pts[j] for j in order], [vals[j] for j in order]
        if vals[-1] - vals[0] < 1e-9:
            break
        centre = np.mean(pts[:-1], axis=0)
        reflected = centre + (centre - pts[-1])
        fr = f(reflected)
        used += 1
        if fr < vals[0]:
            expanded = centre + 2 * (centre - pts[-1])
            fe = f(expanded)
            used += 1
            pts[-1], vals[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = reflected, fr
        else:
            inner = centre + 0.5 * (pts[-1] - centre)
            fi = f(inner)
            used += 1
            if fi < vals[-1]:
                pts[-1], vals[-1] = inner, fi
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
                used += n
    out: FloatArray = pts[int(np.argmin(vals))]
    return out


def minimise_within(f: Callable[[FloatArray], float], lo: FloatArray, hi: FloatArray,
                    starts: Sequence[Sequence[float]], evals: int) -> FloatArray:
    """The best point found for f within [lo, hi] (f sees points clipped into the box): from
    each start, ``nelder_mead`` with ``evals // 2`` evaluations, then again from its result
    with a finer simplex (a collapsed simplex stops short); the best over the starts.

        >>> x = minimise_within(lambda v: float(((v - 3.0) ** 2).sum()), np.zeros(2),
        ...                     np.full(2, 2.0), [[0.5, 0.5]], 200)
        >>> np.round(x, 3).tolist()                  # the box's corner nearest the minimum
        [2.0, 2.0]
    """
    def g(x: FloatArray) -> float:
        return f(np.clip(x, lo, hi))

    best_x, best = None, np.inf
    for start in starts:
        x = np.clip(np.array(start, dtype=np.float64), lo, hi)
        for scale in (0.1, 0.02):
            x = np.clip(nelder_mead(g, x, scale * (hi - lo), evals // 2), lo, hi)
        value = f(x)
        if best_x is None or value < best:
            best_x, best = x, value
    assert best_x is not None, "give at least one start"
    return best_x
