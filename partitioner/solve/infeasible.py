"""What would fit when no partition fits the memory limit: the message behind InfeasibleError.

    >>> from partitioner import CostModel, load_profile, partition_chain
    >>> partition_chain(CostModel(load_profile("h200/gpt-1.3b"), 16, 4, stages=2), 8 * 2**30)
    Traceback (most recent call last):
    ...
    partitioner.solve.infeasible.InfeasibleError: no partition of the 26 layers into K=2 stages fits the memory limit of 8.00 GiB ...

One explainer for every partitioner: it is told the smallest limit that would fit at this K
(each partitioner finds it its own way) and, where the partitioner can answer it cheaply,
whether more stages, recompute or a lighter optimizer would fit under the given limit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from partitioner.cost.model import CostModel, bytes_per_param
from partitioner.formats.units import format_bytes

__all__ = ["InfeasibleError", "explain_infeasible", "too_many_stages"]

#: How many more stages the explainer tries before saying that more do not fit.
_MORE_STAGES = 64


class InfeasibleError(ValueError):
    """No partition fits the memory limit; the message says what would."""


def too_many_stages(cm: CostModel) -> str:
    """The message for K > L: every stage needs a layer."""
    n = cm.profile.num_layers
    return (f"K={cm.stages} stages need at least {cm.stages} layers, but the profile has {n}; "
            f"use --stages {n} or fewer")


def explain_infeasible(cm: CostModel, limit: float, what: str, need_bytes: float, *,
                       fits: Callable[[CostModel], bool] | None = None,
                       below_bytes: float | None = None) -> str:
    """One paragraph: ``what`` (e.g. "partition of the 26 layers") into K stages does not fit
    ``limit``; ``need_bytes`` is the smallest limit found that fits at this K (``below_bytes``:
    a proven bound under it, when it is not proven smallest). With ``fits`` (does a variant
    of ``cm`` fit the limit?) it tries more stages, recompute and a lighter optimizer; without
    it, it names them."""
    big_k, num_layers = cm.stages, cm.profile.num_layers
    proof = ("" if below_bytes is None else
             f" (found within the time limit; none fits below {format_bytes(below_bytes)})")
    lines = [
        f"no {what} into K={big_k} stages fits the memory limit of {format_bytes(limit)} "
        f"(M={cm.microbatches}, B={cm.global_batch}, recompute={cm.recompute}, "
        f"schedule={cm.schedule}, optimizer={cm.optimizer} at "
        f"{bytes_per_param(cm.profile.dtype, cm.optimizer):g} bytes per parameter).",
        f"- The smallest limit that fits at K={big_k}: {format_bytes(need_bytes)}{proof} "
        f"(--memory-limit {math.ceil(need_bytes / 2**20)}MiB).",
    ]
    if fits is None:
        lines.append("- Or spread the state over more stages (--stages), recompute activations "
                     "(--recompute always), or budget a lighter optimizer (--optimizer sgd).")
        return "\n".join(lines)
    top = min(num_layers, big_k + _MORE_STAGES)
    v = cm.stages_per_rank  # K stays a multiple of the stages per rank
    more = next((k for k in range(big_k + v, top + 1, v)
                 if fits(dataclasses.replace(cm, stages=k))), None)
    lines.append(f"- More stages fit: --stages {more} does." if more is not None else
                 f"- More stages do not fit either (tried K up to {top}).")
    for mode in ("except_last", "always"):
        if mode != cm.recompute and cm.recompute != "always":
            ok = fits(dataclasses.replace(cm, recompute=mode))
            lines.append(f"- --recompute {mode} {'fits' if ok else 'does not fit'} at "
                         f"K={big_k}.")
    if cm.optimizer == "adam":
        ok = fits(dataclasses.replace(cm, optimizer="sgd"))
        lines.append(f"- --optimizer sgd (less state) {'fits' if ok else 'does not fit'}.")
    return "\n".join(lines)
