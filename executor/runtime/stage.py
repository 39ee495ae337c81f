"""One pipeline stage: layers [start, end) of the model on one device, able to replay a forward.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> stage = Stage(1, build_layers(model, 1, 3), "cpu", recompute=True)
    >>> [name for name, _ in stage.module.named_children()], stage(torch.ones(4, 2)).shape
    (['1', '2'], torch.Size([4, 1]))

Children keep their global layer index as name, so ``stage.module.named_parameters()`` gives the
same names as the plain model's (``'2.weight'``). A stage built from the model's own layers moves
and uses those very layers: their parameters, and gradients, are the model's.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from executor.runtime.batch import Batch
from executor.runtime.batchnorm import keep_running_stats
from executor.runtime.devices import resolve_device

__all__ = ["LayerSource", "RngState", "Stage", "build_layers", "random_state", "rng_state"]

#: Where a stage's layers come from: the whole model, a callable building layer i, or a callable
#: returning the layers of the half-open range [start, end).
LayerSource = (nn.Sequential | Callable[[int], nn.Module]
               | Callable[[int, int], Sequence[nn.Module]])


def _arity(fn: Callable[..., object]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    return sum(1 for p in params if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def build_layers(source: LayerSource, start: int, end: int) -> list[tuple[int, nn.Module]]:
    """Layers ``start..end-1`` with their global index. Only these are built when ``source`` is
    a factory (``f(i) -> layer`` or ``f(start, end) -> layers``), so a distributed rank never
    materialises the rest of the model."""
    if isinstance(source, nn.Sequential):
        return [(i, source[i]) for i in range(start, end)]
    if not callable(source):
        raise TypeError(f"layers must be an nn.Sequential or a layer factory, got "
                        f"{type(source).__name__}")
    if _arity(source) >= 2:
        built = list(cast(Callable[[int, int], Sequence[nn.Module]], source)(start, end))
        if len(built) != end - start:
            raise ValueError(f"the layer factory returned {len(built)} layers for the range "
                             f"[{start}, {end}); it must return exactly {end - start}")
    else:
        built = [cast(Callable[[int], nn.Module], source)(i) for i in range(start, end)]
    bad = [f"layer {start + j} is a {type(m).__name__}" for j, m in enumerate(built)
           if not isinstance(m, nn.Module)]
    if bad:
        raise TypeError("the layer factory must build nn.Module layers: " + ", ".join(bad))
    return [(start + j, m) for j, m in enumerate(built)]


@dataclass(frozen=True)
class RngState:
    """The random-number state a forward started from, so a re-materialisation can replay it
    (same dropout masks)."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None


@contextmanager
def random_state(state: RngState, device: torch.device) -> Iterator[None]:
    """Run the block from the random state ``state``; the global one is left as it was."""
    devices = [device] if state.cuda is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state.cpu)
        if state.cuda is not None:
            torch.cuda.set_rng_state(state.cuda, device)
        yield


def rng_state(device: torch.device) -> RngState:
    """The random state a forward on ``device`` starts from."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return RngState(torch.get_rng_state(), cuda)


class Stage:
    """Stage ``index``: its layers as one ``nn.Sequential`` on ``device``; ``recompute`` says
    whether it keeps only its input per micro-batch and reruns the forward before backward."""

    def __init__(self, index: int, layers: Sequence[tuple[int, nn.Module]],
                 device: str | torch.device, recompute: bool = False) -> None:
        if not layers:
            raise ValueError(f"stage {index} has no layers; every stage needs at least one")
        self.index = index
        self.device = resolve_device(device)
        self.recompute = recompute
        self.layer_range = (layers[0][0], layers[-1][0] + 1)
        self.module = nn.Sequential(OrderedDict((str(i), m) for i, m in layers))
        self.module.to(self.device)

    def __call__(self, x: Batch) -> Batch:
        out: Batch = self.module(x)
        return out

    def __repr__(self) -> str:
        start, end = self.layer_range
        return f"Stage({self.index}, layers [{start}, {end}), {self.device})"

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def rng_state(self) -> RngState:
        return rng_state(self.device)

    @contextmanager
    def replaying(self, state: RngState) -> Iterator[None]:
        """Re-materialise: the forward inside sees the random state ``state`` (the global one is
        left as it was) and leaves BatchNorm running statistics unchanged."""
        with random_state(state, self.device), keep_running_stats(self.module):
            yield
