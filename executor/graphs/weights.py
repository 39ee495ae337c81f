"""A stage's own weights only: materialise a meta-device model's parameters for some layers.

    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> real = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pt"); save_weights(real, path)
    >>> with torch.device("meta"):
    ...     model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> materialise([model[1]], model, path, torch.device("cpu"))
    >>> model[0].weight.is_meta, torch.equal(model[1].weight, real[1].weight)
    (True, True)

A rank of the distributed runner builds the whole model on the meta device (no memory, no
initialisation), traces it there, and gives real tensors only to what its own layers use,
loaded from a weights file (``save_weights`` writes every parameter and every buffer, also the
non-persistent ones such as rotary frequencies, by the model's own names; ``torch.load`` maps
it, so a rank reads only its part) or from a mapping of names to tensors. A parameter used
in several places (tied) stays one parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["is_meta", "materialise", "save_weights"]


def is_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is on the meta device."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Every parameter and buffer of ``model`` by name (tied ones under each name)."""
    state = {name: t.detach().cpu() for name, t in model.named_parameters(remove_duplicate=False)}
    state.update({name: t.detach().cpu()
                  for name, t in model.named_buffers(remove_duplicate=False)})
    torch.save(state, str(path))


def _load(weights: Mapping[str, torch.Tensor] | str | Path) -> Mapping[str, torch.Tensor]:
    if isinstance(weights, Mapping):
        return weights
    try:
        loaded = torch.load(str(weights), map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"cannot read the weights file {str(weights)!r}: {exc}; write it with "
                         f"executor.graphs.weights.save_weights(model, path)") from None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"the weights file {str(weights)!r} holds a {type(loaded).__name__}, "
                         f"not a mapping of names to tensors")
    return loaded


def materialise(modules: Iterable[nn.Module], model: nn.Module,
                weights: Mapping[str, torch.Tensor] | str | Path | None,
                device: torch.device) -> None:
    """Give every meta parameter and buffer that ``modules`` use real values on ``device``
    from ``weights``, in ``modules`` and in ``model`` alike (ValueError naming what is
    missing)."""
    modules = list(modules)
    metas = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_meta}
    if not metas:
        return
    if weights is None:
        raise ValueError("the model is on the meta device: give weights= (a file written by "
                         "save_weights, or a mapping of parameter names to tensors) so this "
                         "rank can load its stage's parameters")
    state = _load(weights)
    names: dict[int, list[str]] = {}
    for name, t in (*model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(name)
    new: dict[int, Any] = {}
    for key, old in metas.items():
        found = next((n for n in names.get(key, []) if n in state), None)
        if found is None:
            raise ValueError(f"the weights have no entry for {names.get(key, ['?'])[0]!r} "
                             f"(shape {tuple(old.shape)}); save them with save_weights(model, "
                             f"path) from the model with its real weights")
        value = state[found]
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"weights[{found!r}] has shape {tuple(value.shape)} but the model's "
                             f"is {tuple(old.shape)}; the weights are of another model")
        tensor = value.to(device=device, dtype=old.dtype, copy=True)
        new[key] = (nn.Parameter(tensor, requires_grad=old.requires_grad)
                    if isinstance(old, nn.Parameter) else tensor)
    for m in {id(m): m for root in (*modules, model) for m in root.modules()}.values():
        tables: tuple[dict[str, Any], ...] = (m._parameters, m._buffers)
        for table in tables:
            for attr, t in list(table.items()):
                if t is not None and id(t) in new:
                    table[attr] = new[id(t)]
