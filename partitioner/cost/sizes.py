"""Micro-batch sizes: how B samples split into M micro-batches, and figures at any size b.

    >>> split_microbatches(10, 4), interpolate(np.array([[1.0, 3.0]]), (1, 2), 4).tolist()
    ([3, 3, 2, 2], [7.0])
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from partitioner.schedule.generators import MAX_MICROBATCHES

__all__ = ["FloatArray", "interpolate", "split_microbatches"]

FloatArray = npt.NDArray[np.float64]


def interpolate(table: FloatArray, sizes: tuple[int, ...], b: float) -> FloatArray:
    """Rows of ``table`` (one column per measured size) at micro-batch size b: piecewise
    linear between the sizes, linear outside them, never below zero.

        >>> interpolate(np.array([[1.0, 3.0]]), (1, 2), 4).tolist()
        [7.0]
    """
    n_sizes = len(sizes)
    table = table.reshape(-1, n_sizes)
    if n_sizes == 1:
        out: FloatArray = np.maximum(table[:, 0] * (b / sizes[0]), 0.0)
        return out
    lo = min(max(int(np.searchsorted(sizes, b)) - 1, 0), n_sizes - 2)
    x0, x1 = sizes[lo], sizes[lo + 1]
    y0, y1 = table[:, lo], table[:, lo + 1]
    out = np.maximum(y0 + (y1 - y0) * ((b - x0) / (x1 - x0)), 0.0)
    return out


def split_microbatches(global_batch: int, microbatches: int) -> list[int]:
    """Sizes of the M micro-batches of a batch of B samples: as equal as possible, larger first.

        >>> split_microbatches(10, 4)
        [3, 3, 2, 2]
    """
    if not 1 <= microbatches <= MAX_MICROBATCHES:
        raise ValueError(f"microbatches M={microbatches} must be in 1..{MAX_MICROBATCHES}")
    if global_batch < microbatches:
        raise ValueError(
            f"global batch B={global_batch} is smaller than M={microbatches} micro-batches; "
            f"every micro-batch needs a sample: use M <= {global_batch} or a larger batch"
        )
    base, extra = divmod(global_batch, microbatches)
    return [base + 1] * extra + [base] * (microbatches - extra)
