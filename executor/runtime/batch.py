"""Micro-batches: split a batch (a tensor or a tuple of tensors) along dim 0, and join it back.

    >>> import torch
    >>> parts = scatter((torch.arange(10), torch.ones(10, 2)), [3, 3, 2, 2])
    >>> [batch_size(p) for p in parts], gather([p[0] for p in parts]).tolist() == list(range(10))
    ([3, 3, 2, 2], True)

Sizes follow ``partitioner.cost.model.split_microbatches``: as even as possible, larger first, so
the last micro-batches are the smaller ones when M does not divide B.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

__all__ = ["Batch", "as_tuple", "batch_size", "check_batch", "from_tuple", "gather", "like",
           "move", "scatter"]

#: What flows between layers of an ``nn.Sequential``: one tensor or a tuple of tensors.
Batch = torch.Tensor | tuple[torch.Tensor, ...]


def as_tuple(batch: Batch) -> tuple[torch.Tensor, ...]:
    """The tensors of a batch, in order (a lone tensor becomes a 1-tuple)."""
    return batch if isinstance(batch, tuple) else (batch,)


def from_tuple(tensors: Sequence[torch.Tensor], is_tuple: bool) -> Batch:
    """Inverse of ``as_tuple``: ``is_tuple`` says whether the original was a tuple."""
    return tuple(tensors) if is_tuple else tensors[0]


def like(batch: Batch, tensors: Sequence[torch.Tensor]) -> Batch:
    """``tensors`` shaped as ``batch``: the one tensor if it is a tensor, else a tuple."""
    return from_tuple(tensors, isinstance(batch, tuple))


def check_batch(batch: object, name: str) -> Batch:
    """Return ``batch`` if it is a tensor or a non-empty tuple of tensors that agree on dim 0;
    otherwise raise TypeError/ValueError saying what is wrong."""
    if isinstance(batch, list):
        batch = tuple(batch)
    parts = batch if isinstance(batch, tuple) else (batch,)
    bad = [type(p).__name__ for p in parts if not isinstance(p, torch.Tensor)]
    if not parts or bad:
        raise TypeError(f"{name} must be a tensor or a tuple of tensors, got "
                        f"{type(batch).__name__}{' of ' + ', '.join(bad) if bad else ''}")
    sizes = [p.shape[0] if p.dim() > 0 else None for p in parts]
    if None in sizes or len(set(sizes)) != 1:
        raise ValueError(f"{name}: every tensor needs the same batch size along dim 0, got "
                         f"sizes {sizes}; give tensors shaped (B, ...)")
    return cast(Batch, batch)


def batch_size(batch: Batch) -> int:
    """B, the size of dim 0 (shared by all tensors of the batch)."""
    return int(as_tuple(batch)[0].shape[0])


def scatter(batch: Batch, sizes: Sequence[int]) -> list[Batch]:
    """Split ``batch`` into micro-batches of the given sizes along dim 0 (views, no copies)."""
    parts = [torch.split(t, list(sizes), dim=0) for t in as_tuple(batch)]
    is_tuple = isinstance(batch, tuple)
    return [from_tuple([p[i] for p in parts], is_tuple) for i in range(len(sizes))]


def gather(chunks: Sequence[Batch]) -> Batch:
    """Concatenate micro-batch outputs along dim 0 (the inverse of ``scatter``)."""
    first = chunks[0]
    columns = zip(*(as_tuple(c) for c in chunks), strict=True)
    return from_tuple([torch.cat(col, dim=0) for col in columns], isinstance(first, tuple))


def move(batch: object, device: torch.device) -> Any:
    """The batch on ``device`` (a tensor, or a tuple or list of them, which comes back as a
    tuple); anything else is returned as it is, for ``check_batch`` to refuse with a message."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch)
    return batch
