"""What would fit when no partition fits the memory limit: the message behind InfeasibleError.

    >>> from partitioner import CostModel, load_profile
    >>> cm = CostModel(load_profile("h200/gpt-1.3b"), 16, 4, stages=2)
    >>> print(explain_infeasible(cm, 8 * 2**30))          # doctest: +ELLIPSIS
    no partition of the 26 layers into K=2 stages fits the memory limit of 8.00 GiB ...
"""

from __future__ import annotations

import dataclasses
import math

from .chain import _Search, min_memory_cuts, stage_costs
from .costs import CostModel, bytes_per_param
from .units import format_bytes

__all__ = ["explain_infeasible"]


def _fits(cm: CostModel, limit: float) -> bool:
    return _Search(cm, limit, memory_objective=False).reach(math.inf) is not None


def explain_infeasible(cm: CostModel, limit: float) -> str:
    """One paragraph: the smallest limit that fits at this K and M, and whether more stages or
    recompute would fit under the given limit."""
    big_k, num_layers = cm.stages, cm.profile.num_layers
    need = max(stage_costs(cm, min_memory_cuts(cm)).stage_memory_bytes)
    lines = [
        f"no partition of the {num_layers} layers into K={big_k} stages fits the memory limit "
        f"of {format_bytes(limit)} (M={cm.microbatches}, B={cm.global_batch}, "
        f"recompute={cm.recompute}, schedule={cm.schedule}, optimizer={cm.optimizer} at "
        f"{bytes_per_param(cm.profile.dtype, cm.optimizer):g} bytes per parameter).",
        f"- The smallest limit that fits at K={big_k}: {format_bytes(need)} "
        f"(--memory-limit {math.ceil(need / 2**20)}MiB).",
    ]
    more = next((k for k in range(big_k + 1, min(num_layers, big_k + 64) + 1)
                 if _fits(dataclasses.replace(cm, stages=k), limit)), None)
    if more is not None:
        lines.append(f"- More stages fit: --stages {more} does.")
    else:
        lines.append(f"- More stages do not fit either (tried K up to "
                     f"{min(num_layers, big_k + 64)}).")
    for mode in ("except_last", "always"):
        if mode != cm.recompute and cm.recompute != "always":
            fits = _fits(dataclasses.replace(cm, recompute=mode), limit)
            lines.append(f"- --recompute {mode} {'fits' if fits else 'does not fit'} at "
                         f"K={big_k}.")
    if cm.optimizer == "adam":
        fits = _fits(dataclasses.replace(cm, optimizer="sgd"), limit)
        lines.append(f"- --optimizer sgd (less state) {'fits' if fits else 'does not fit'}.")
    return "\n".join(lines)
