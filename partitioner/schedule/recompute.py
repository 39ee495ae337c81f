"""Re-materialisation: the modes a plan can name, and which stages recompute under each.

    >>> [recomputes("except_last", k, 3) for k in range(3)]
    [True, True, False]

A recomputing stage keeps only its input per micro-batch and reruns its forward before the
backward (GPipe paper, Section 2.3). ``except_last`` spares the last stage, whose backward
follows its forward at once, so it would free nothing. The cost model, the simulator and the
executor all ask ``recomputes``.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["RECOMPUTE_MODES", "Recompute", "recomputes"]

Recompute = Literal["never", "always", "except_last"]
RECOMPUTE_MODES: tuple[str, ...] = get_args(Recompute)


def recomputes(mode: str, stage: int, stages: int) -> bool:
    """Whether stage k of K re-materialises its activations under ``mode``."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute {mode!r} is not one of {', '.join(RECOMPUTE_MODES)}")
    if mode == "except_last":
        return stage != stages - 1
    return mode == "always"
