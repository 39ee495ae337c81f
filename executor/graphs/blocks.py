"""Which modules of a model are its layers: repeated blocks by default, or the user's leaves.

    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return self.fc(x)
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed, self.h, self.head = nn.Linear(4, 4), nn.ModuleList(Block() for _ in range(3)), nn.Linear(4, 2)
    >>> sorted(block_paths(Net()))
    ['h.0', 'h.1', 'h.2']

A *repeated block* is a child of an ``nn.ModuleList`` or ``nn.Sequential`` whose two or more
children are all of one class and have modules of their own (``transformer.h.7``,
``model.layers.3``, ``layer2.1``); the outermost such containers count. A block that only wraps
a container of blocks is replaced by those (a ResNet stage that holds nothing but its
residual blocks becomes those blocks), so the layers are as fine as the model's own
repetition. A model without repeated blocks has
its children as layers. ``leaves`` (module classes or name patterns such as ``"encoder.layer.*"``) replace
the rule: the outermost modules that match are the layers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

__all__ = ["Leaf", "block_paths"]

#: A leaf the user names: a module class, or a pattern of module names (fnmatch).
Leaf = type[nn.Module] | str

def _repeats(module: nn.Module) -> bool:
    """A container of two or more children of one class that have modules of their own."""
    kids = list(module.children())
    return (isinstance(module, (nn.ModuleList, nn.Sequential)) and len(kids) >= 2
            and len({type(k) for k in kids}) == 1
            and all(any(True for _ in k.children()) for k in kids))


def _expand(module: nn.Module, path: str) -> list[str]:
    """The block at ``path``, or the blocks it only wraps (down a chain of single children
    to a container of repeated blocks)."""
    mod, at = module, path
    while True:
        if _repeats(mod):
            return [b for name, child in mod.named_children() for b in _expand(child, f"{at}.{name}")]
        kids = list(mod.named_children())
        if len(kids) != 1:
            return [path]
        name, mod = kids[0]
        at = f"{at}.{name}"


def _blocks_of(module: nn.Module) -> list[str]:
    """The children of the outermost containers of repeated blocks, each expanded."""
    blocks: list[str] = []

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if _repeats(child):
                blocks.extend(_expand(child, path))
            else:
                walk(child, path)
    walk(module, "")
    return blocks


def _matches(name: str, module: nn.Module, leaves: Sequence[Leaf]) -> bool:
    return any(isinstance(module, leaf) if isinstance(leaf, type) else
               fnmatch.fnmatchcase(name, leaf) for leaf in leaves)


def block_paths(model: nn.Module, leaves: Sequence[Leaf] = ()) -> set[str]:
    """The module names whose calls are layers of their own: ``leaves`` when given (the
    outermost matching modules; ValueError if none matches), else the repeated blocks."""
    bad = [leaf for leaf in leaves if not (isinstance(leaf, str) or (
        isinstance(leaf, type) and issubclass(leaf, nn.Module)))]
    if bad:
        raise TypeError(f"leaves must be nn.Module classes or module-name patterns, got "
                        f"{bad[0]!r}")
    if not leaves:  # no repeated blocks: each child of the model is a layer
        return set(_blocks_of(model)) or {name for name, _ in model.named_children()}
    chosen: set[str] = set()
    for name, module in model.named_modules():
        if name and _matches(name, module, leaves) and not any(
                name.startswith(f"{c}.") for c in chosen):
            chosen.add(name)
    if not chosen:
        raise ValueError(f"no module of {type(model).__name__} matches the leaves "
                         f"{[getattr(x, '__name__', x) for x in leaves]}; name module classes "
                         f"the model uses or patterns of its module names (e.g. 'layers.*')")
    return chosen
