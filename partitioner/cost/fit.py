"""A derivative-free minimiser for the few figures the device models fit.

    >>> x = nelder_mead(lambda v: float(((v - np.array([1.0, -2.0])) ** 2).sum()),
    ...                 np.zeros(2), np.ones(2), 400)
    >>> np.round(x, 3).tolist()
    [1.0, -2.0]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from partitioner.cost.sizes import FloatArray

__all__ = ["nelder_mead"]

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
