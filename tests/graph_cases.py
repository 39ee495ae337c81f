"""Shared helpers of the graph tests: the plain model's step (the oracle) and gradient checks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from executor.graphs.batches import split_tree
from partitioner.cost.model import split_microbatches

RTOL = 1e-5


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def call(model: nn.Module, sample: Any) -> Any:
    kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache",
                                             None) is not None else {}
    if isinstance(sample, dict):
        return model(**sample, **kwargs)
    return model(*(sample if isinstance(sample, tuple) else (sample,)), **kwargs)


def plain_step(model: nn.Module, sample: Any, target: torch.Tensor,
               loss_fn: Callable[[Any, Any], torch.Tensor], microbatches: int = 1
               ) -> tuple[float, dict[str, torch.Tensor]]:
    """The plain model's loss and gradients on the batch; with BatchNorm in training mode it
    runs micro-batch by micro-batch (each normalised with its own statistics), as the
    pipeline does, with the losses weighted by b_i / B."""
    model.zero_grad(set_to_none=True)
    b = int(target.shape[0])
    per_mb = has_batchnorm(model) and model.training
    sizes = split_microbatches(b, microbatches) if per_mb else [b]
    total = 0.0
    for x, y in zip(split_tree(sample, sizes), split_tree(target, sizes), strict=True):
        loss = loss_fn(call(model, x), y) * (int(y.shape[0]) / b)
        loss.backward()
        total += float(loss.detach())
    grads = model_grads(model)
    model.zero_grad(set_to_none=True)
    return total, grads


def canonical(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter -> the name ``named_parameters()`` gives it (tied
    parameters have several names)."""
    first = {id(p): n for n, p in model.named_parameters()}
    return {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}


def grad_problems(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                  rtol: float = RTOL) -> list[str]:
    """Every parameter whose gradient differs from the oracle's by more than ``rtol`` of its
    largest entry (with a floor of 1e-3 of the model's largest gradient, for parameters whose
    gradient is zero up to rounding, such as attention key biases)."""
    scale = max(float(g.abs().max()) for g in want.values())
    problems = [f"{name}: no gradient" for name in want if name not in got]
    for name, g in got.items():
        if name not in want:
            continue
        ref = want[name]
        bound = rtol * max(float(ref.abs().max()), 1e-3 * scale)
        err = float((g.detach().cpu() - ref).abs().max())
        if err > bound:
            problems.append(f"{name}: max error {err:.3g} > {bound:.3g}")
    return problems


def model_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def balanced_nodes(num_layers: int, stages: int) -> list[list[int]]:
    """Layer ranges of nearly equal counts (convex in any topological order)."""
    cuts = [round(k * num_layers / stages) for k in range(stages + 1)]
    return [list(range(cuts[k], cuts[k + 1])) for k in range(stages)]


def no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


CASES: Sequence[tuple[int, str, str]] = (  # (M, recompute, schedule): every pair covered
    (1, "never", "gpipe"), (3, "always", "1f1b"), (4, "always", "gpipe"), (4, "never", "1f1b"),
    (3, "never", "gpipe"), (1, "always", "1f1b"))
