"""Tied parameters: one parameter used by several layers (e.g. an embedding and the LM head).

    >>> import torch
    >>> emb, head = torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False)
    >>> head.weight = emb.weight
    >>> model = torch.nn.Sequential(emb, torch.nn.Tanh(), head)
    >>> tied_parameters(model)
    {'0.weight': [0, 2]}
    >>> check_ties(tied_parameters(model), [(0, 2), (2, 3)])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    partitioner.formats.plan.PlanError: parameter '0.weight' is used by layers [0, 2], which the plan puts on stages [0, 1]. ...

Split across stages, each rank would train its own copy of such a parameter and the copies
would drift apart, so until tied parameters are supported a plan that splits them is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from partitioner.formats.plan import PlanError

__all__ = ["check_ties", "tied_parameters"]


def tied_parameters(model: nn.Sequential) -> dict[str, list[int]]:
    """Each parameter that more than one layer uses: its name (where it is first used, as
    ``model.named_parameters()`` names it) and the layers that use it."""
    users: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for i, layer in enumerate(model):
        for name, param in layer.named_parameters(remove_duplicate=True):
            users.setdefault(id(param), [])
            if i not in users[id(param)]:
                users[id(param)].append(i)
            names.setdefault(id(param), f"{i}.{name}")
    return {names[key]: layers for key, layers in users.items() if len(layers) > 1}


def check_ties(ties: Mapping[str, Sequence[int]], ranges: Sequence[tuple[int, int]]) -> None:
    """PlanError naming every tied parameter whose layers the stages ``ranges`` split."""
    stage_of = {i: k for k, (start, end) in enumerate(ranges) for i in range(start, end)}
    problems = []
    for name, layers in ties.items():
        stages = sorted({stage_of[i] for i in layers if i in stage_of})
        if len(stages) > 1:
            problems.append(f"parameter {name!r} is used by layers {list(layers)}, which the plan "
                            f"puts on stages {stages}")
    if problems:
        raise PlanError("; ".join(problems) + ". Tied parameters cannot be split across stages "
                        "yet (each rank would train its own copy): plan with a cut that keeps "
                        "those layers on one stage, or untie them (give each layer its own "
                        "copy)")
