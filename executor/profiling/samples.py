"""Samples of any model's inputs: resize the batch dimension, move them, describe them for a profile.

    >>> import torch
    >>> s = {"input_ids": torch.arange(6).view(3, 2), "scale": torch.ones(2)}
    >>> resize_sample(s, 5)["input_ids"][:, 0].tolist(), resize_sample(s, 5)["scale"].shape
    ([0, 2, 4, 0, 2], torch.Size([2]))

A sample is a tensor, a tuple of positional tensors or a dict of keyword tensors (such as an
``attention_mask``). Its batch B is dimension 0 of its first tensor; a tensor whose dimension
0 is B is batched, and any other (a per-model constant) stays as it is at every size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from executor.graphs.capture import batch_of
from executor.graphs.layers import as_call

__all__ = ["describe_sample", "move_sample", "resize_sample", "sample_batch"]


def sample_batch(sample: Any) -> int:
    """B, the sample's batch size (TypeError when it has no batched tensor)."""
    args, kwargs = as_call(sample)
    return batch_of(args, kwargs)


def resize_sample(sample: Any, b: int) -> Any:
    """The sample with batch ``b``: rows taken cyclically from its batched tensors (fresh
    tensors, their own storage); other tensors and values as they are."""
    big_b = sample_batch(sample)

    def take(leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == big_b:
            return leaf[torch.arange(b, device=leaf.device) % big_b].contiguous()
        return leaf
    return pytree.tree_map(take, sample)


def move_sample(sample: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """The sample on ``device``, floating tensors cast to ``dtype`` (None keeps them)."""
    def move(leaf: Any) -> Any:
        if not isinstance(leaf, Tensor):
            return leaf
        cast = dtype if dtype is not None and leaf.is_floating_point() else leaf.dtype
        return leaf.detach().to(device=device, dtype=cast)
    return pytree.tree_map(move, sample)


def _describe(t: Any, big_b: int) -> Any:
    if not isinstance(t, Tensor):
        return repr(t)
    batched = t.dim() > 0 and t.shape[0] == big_b
    return {"shape": list(t.shape[1:] if batched else t.shape),
            "dtype": str(t.dtype).removeprefix("torch."), "batched": batched}


def describe_sample(sample: Any, info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The profile's ``input``: each input's shape (without the batch dimension where
    batched) and dtype, by position (``args``) and by name (``kwargs``), plus ``info``."""
    args, kwargs = as_call(sample)
    big_b = batch_of(args, kwargs)
    out: dict[str, Any] = dict(info or {})
    if args:
        out["args"] = [_describe(t, big_b) for t in args]
    if kwargs:
        out["kwargs"] = {key: _describe(t, big_b) for key, t in kwargs.items()}
    return out
