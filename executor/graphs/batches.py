"""Micro-batches of any model's inputs and outputs: tensors, tuples, dicts, ``ModelOutput``s.

    >>> import torch
    >>> parts = split_tree({"input_ids": torch.arange(6).reshape(3, 2), "flag": True}, [2, 1])
    >>> [p["input_ids"].shape[0] for p in parts], parts[1]["flag"]
    ([2, 1], True)
    >>> join_tree([{"x": torch.ones(2, 1)}, {"x": torch.zeros(1, 1)}])["x"].shape
    torch.Size([3, 1])

A tensor whose dimension 0 is the batch B is cut along it; anything else (a tensor of another
first dimension, such as a position table of shape (1, T), ``None``, flags, sizes) goes to
every micro-batch as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["batch_size_of", "join_tree", "move_tree", "split_tree"]


def batch_size_of(tree: Any, what: str = "inputs") -> int:
    """B: dimension 0 of the first tensor in ``tree``."""
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise TypeError(f"{what} hold no tensor with a batch dimension; give a tensor, a tuple of "
                    f"tensors or a dict of tensors shaped (B, ...)")


def split_tree(tree: Any, sizes: Sequence[int]) -> list[Any]:
    """``tree`` cut into micro-batches of ``sizes`` along dimension 0 (views, no copies)."""
    total = sum(sizes)
    leaves, spec = pytree.tree_flatten(tree)
    columns: list[Sequence[Any]] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == total:
            columns.append(torch.split(leaf, list(sizes), dim=0))
        else:
            columns.append([leaf] * len(sizes))
    return [pytree.tree_unflatten([col[i] for col in columns], spec) for i in range(len(sizes))]


def join_tree(parts: Sequence[Any]) -> Any:
    """Inverse of ``split_tree`` for outputs: tensors concatenated along dimension 0 when they
    differ across micro-batches in that dimension or carry one row per sample; other leaves
    are the first micro-batch's."""
    flat = [pytree.tree_flatten(p) for p in parts]
    spec = flat[0][1]
    joined = []
    for column in zip(*(leaves for leaves, _ in flat), strict=True):
        first = column[0]
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            joined.append(torch.cat(list(column), dim=0))
        else:
            joined.append(first)
    return pytree.tree_unflatten(joined, spec)


def move_tree(tree: Any, device: torch.device) -> Any:
    """``tree`` with every tensor on ``device``."""
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)
