"""BatchNorm under micro-batching: recompute that does not count twice, and deferred statistics.

    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> deferred = DeferredBatchNorm(bn)
    >>> deferred.begin_step(); _ = [bn(x) for x in torch.randn(8, 3).split([5, 3])]
    >>> deferred.end_step(); int(bn.num_batches_tracked)   # one update per mini-batch
    1

A re-materialising forward leaves the running statistics as they were. By default each
micro-batch is normalised with its own statistics and BatchNorm updates its running statistics
once per micro-batch (as torch does for any batch it sees), so in training mode a pipelined
step equals the plain model run micro-batch by micro-batch, not on the whole batch at once.
With ``DeferredBatchNorm`` the normalisation is unchanged, but the running statistics are
updated once per training step from the mean and variance of the whole mini-batch, so they
equal those of the plain model on the same batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["DeferredBatchNorm", "batchnorms", "is_recomputing", "keep_running_stats"]

_STATE = threading.local()


def is_recomputing() -> bool:
    """True inside a re-materialising forward (``keep_running_stats``)."""
    return bool(getattr(_STATE, "recomputing", False))


def batchnorms(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``module`` that keep running statistics."""
    return [m for m in module.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]


@contextmanager
def keep_running_stats(module: nn.Module) -> Iterator[None]:
    """Run a re-materialising forward: BatchNorm running statistics are restored afterwards, so a
    micro-batch updates them once (in its first forward), not twice."""
    saved = [(bn, [b.clone() for b in _buffers(bn)]) for bn in batchnorms(module)]
    before = is_recomputing()
    _STATE.recomputing = True
    try:
        yield
    finally:
        _STATE.recomputing = before
        with torch.no_grad():  # through .data: autograd may hold the buffers for the backward
            for bn, copies in saved:
                for buf, copy in zip(_buffers(bn), copies, strict=True):
                    buf.data.copy_(copy)


def _buffers(bn: _BatchNorm) -> list[torch.Tensor]:
    bufs = [bn.running_mean, bn.running_var, bn.num_batches_tracked]
    return [b for b in bufs if b is not None]


class DeferredBatchNorm:
    """Hooks on every BatchNorm of ``module`` that defer its running-statistics update to the end
    of the step, computed over all micro-batches seen in training forwards since ``begin_step``
    (re-materialising forwards excluded). ``remove()`` takes the hooks off."""

    def __init__(self, module: nn.Module) -> None:
        self._layers = batchnorms(module)
        self._sums: dict[int, list[torch.Tensor]] = {}
        self._saved: dict[int, list[torch.Tensor]] = {}
        self._handles = [bn.register_forward_pre_hook(self._hook) for bn in self._layers]

    def begin_step(self) -> None:
        """Snapshot the running statistics and start accumulating."""
        self._sums = {}
        self._saved = {id(bn): [b.clone() for b in _buffers(bn)] for bn in self._layers}

    def _hook(self, bn: nn.Module, args: tuple[Any, ...]) -> None:
        if not bn.training or is_recomputing() or not self._saved:
            return
        x = args[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        with torch.no_grad():
            x64 = x.to(torch.float64)
            count = torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64,
                                 device=x.device)
            parts = [x64.sum(dims), (x64 * x64).sum(dims), count]
        acc = self._sums.get(id(bn))
        self._sums[id(bn)] = parts if acc is None else [a + p for a, p in
                                                         zip(acc, parts, strict=True)]

    def end_step(self) -> None:
        """Restore the snapshot, then apply one update from the whole mini-batch's statistics."""
        with torch.no_grad():
            for bn in self._layers:
                sums = self._sums.get(id(bn))
                if sums is None:
                    continue
                for buf, copy in zip(_buffers(bn), self._saved[id(bn)], strict=True):
                    buf.copy_(copy)
                total, squares, count = sums
                mean = total / count
                var = (squares / count - mean * mean).clamp_min(0)
                unbiased = var * count / (count - 1).clamp_min(1)
                assert bn.running_mean is not None and bn.running_var is not None
                tracked = bn.num_batches_tracked
                if tracked is not None:
                    tracked.add_(1)
                factor = bn.momentum if bn.momentum is not None else (
                    1.0 / float(tracked) if tracked is not None else 0.0)
                bn.running_mean.mul_(1 - factor).add_(factor * mean.to(bn.running_mean.dtype))
                bn.running_var.mul_(1 - factor).add_(factor * unbiased.to(bn.running_var.dtype))
        self._sums, self._saved = {}, {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
