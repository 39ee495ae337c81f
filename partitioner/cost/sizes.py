"""Micro-batch sizes and the split of a backward into its input and weight gradients.

How B samples split into M micro-batches, and a profile's figures at any size b.

    >>> split_microbatches(10, 4), interpolate(np.array([[1.0, 3.0]]), (1, 2), 4).tolist()
    ([3, 3, 2, 2], [7.0])
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from partitioner.formats.profile import Profile
from partitioner.schedule.generators import MAX_MICROBATCHES

__all__ = ["WEIGHT_GRAD_SHARE", "FloatArray", "interpolate", "split_backward", "split_microbatches"]

FloatArray = npt.NDArray[np.float64]

#: The share of a layer's backward that its weight gradient (W) takes when the profile does not
#: measure the split, for a layer with parameters (one without has no W). Measured on this
#: project: deferring the weight GEMMs of linear layers (``executor/runtime/splitgrad.py``)
#: moved 35-41% of a GPT block's backward to W on CPU.
WEIGHT_GRAD_SHARE = 0.4


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


def split_backward(profile: Profile, key: str) -> FloatArray:
    """Every layer's ``bwd_input_ms`` or ``bwd_weight_ms`` (``key``), a column per measured
    size: the profile's where a layer has both, else its ``bwd_ms`` split by the rule (a
    layer without parameters has no W; one with parameters W = ``WEIGHT_GRAD_SHARE`` of it).

        >>> from partitioner import load_profile
        >>> prof = load_profile("h200/gpt2-medium")
        >>> w = split_backward(prof, "bwd_weight_ms")
        >>> float(w[1, 0]) == WEIGHT_GRAD_SHARE * prof.layers[1].bwd_ms[0]
        True
    """
    weight = key == "bwd_weight_ms"
    rows = []
    for lay in profile.layers:
        if lay.bwd_input_ms is not None and lay.bwd_weight_ms is not None:
            rows.append(getattr(lay, key))
            continue
        share = WEIGHT_GRAD_SHARE if lay.param_bytes > 0 else 0.0
        rows.append(tuple(x * (share if weight else 1.0 - share) for x in lay.bwd_ms))
    return np.array(rows, dtype=np.float64)
