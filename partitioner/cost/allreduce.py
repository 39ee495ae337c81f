"""The gradients' all-reduce between a stage's D replicas: a ring over the slowest link it crosses.

    >>> from partitioner.formats.assumptions import Link
    >>> round(ring_allreduce_ms(1e9, 4, Link(50.0, 0.005)), 6)   # 2 (n-1)/n x 1 GB / 50 GB/s + 6 x 5 us
    30.03
    >>> ring_allreduce_ms(1e9, 1, Link(50.0, 0.005))   # one replica: nothing to reduce
    0.0

A ring all-reduce of S bytes over n ranks is a reduce-scatter then an all-gather, each n-1
steps that move S/n bytes per rank: 2 (n-1)/n x S / bandwidth + 2 (n-1) x latency. A stage's
gradients weigh its parameters (the profile's ``param_bytes``, in the model's dtype; a tied
parameter counts in the layer that owns it, where it lives).
"""

from __future__ import annotations

import math

import numpy as np

from partitioner.cost.model import CostModel, FloatArray
from partitioner.formats.assumptions import Link

__all__ = ["grad_bytes", "ring_allreduce_ms", "stage_allreduce_ms"]


def ring_allreduce_ms(n_bytes: float, ranks: int, link: Link) -> float:
    """A ring all-reduce of ``n_bytes`` over ``ranks`` ranks joined by ``link``."""
    if ranks <= 1 or n_bytes <= 0:
        return 0.0
    steps = 2 * (ranks - 1)
    wire = 0.0 if math.isinf(link.bandwidth_gbps) else (
        steps / ranks * n_bytes / (link.bandwidth_gbps * 1e6))
    return wire + steps * link.latency_ms


def grad_bytes(cm: CostModel) -> FloatArray:
    """The gradient bytes of every layer: its parameters' bytes."""
    out: FloatArray = np.array([lay.param_bytes for lay in cm.profile.layers],
                               dtype=np.float64)
    return out


def stage_allreduce_ms(cm: CostModel, stage_grad_bytes: list[float]) -> list[float]:
    """Each stage's all-reduce over the model's D replicas and ``allreduce_link``."""
    return [ring_allreduce_ms(b, cm.replicas, cm.allreduce_link) for b in stage_grad_bytes]
