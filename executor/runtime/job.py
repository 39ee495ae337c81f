"""A training job: what every rank needs to build its stage and train it, named ``module:function``.

    >>> job = load_job("executor.workloads.jobs:demo")
    >>> job.num_layers, type(job.layers(0)).__name__
    (7, 'Linear')

``partition-model run --job mypkg.train:job`` and the calibration name a function that takes
no arguments and returns a ``Job``; each rank calls it and builds only its own layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from executor.runtime.interpreter import LossFn
from executor.runtime.stage import LayerSource
from partitioner.formats.specs import load_spec

__all__ = ["Job", "load_job"]


@dataclass(frozen=True)
class Job:
    """What every rank needs to train: ``layers`` (a factory: ``f(i)`` or ``f(start, end)``;
    or any other ``nn.Module``, which each rank traces on ``sample``, built on the meta device
    with its stage loaded from ``weights``: see ``executor.graphs``), ``num_layers`` (chains),
    ``batch(step, B) -> (inputs, targets)`` (the same on every rank; only the first rank's
    inputs and the last rank's targets are used), ``loss_fn(output, targets)`` (mean over the
    batch) and ``optimizer(params)`` (default SGD, lr 0.01)."""

    layers: LayerSource | nn.Module
    num_layers: int | None
    batch: Callable[[int, int], tuple[Any, Any]]
    loss_fn: LossFn
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None
    sample: Any = None
    weights: str | None = None

    @property
    def is_graph(self) -> bool:
        """Whether the job's model is traced (a module that is not an nn.Sequential)."""
        return isinstance(self.layers, nn.Module) and not isinstance(self.layers, nn.Sequential)

    def __post_init__(self) -> None:
        if self.is_graph:
            if self.sample is None:
                raise ValueError("Job(layers=<a traced model>, sample=None): give sample=, a "
                                 "small batch of the model's inputs to trace it on")
        elif isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) \
                or self.num_layers < 1:
            raise ValueError(f"Job(num_layers={self.num_layers!r}): give the model's layer "
                             f"count, a whole number >= 1")
        for name in ("layers", "batch", "loss_fn"):
            if not callable(getattr(self, name)):
                raise TypeError(f"Job({name}=...) must be callable, got "
                                f"{type(getattr(self, name)).__name__}")


def load_job(spec: str) -> Job:
    """The Job returned by the function ``spec`` names (``module:function``)."""
    func = load_spec(spec, "--job")
    if not callable(func):
        raise TypeError(f"--job {spec!r} is a {type(func).__name__}, not a function")
    job = func()
    if not isinstance(job, Job):
        raise TypeError(f"--job {spec!r} returned {type(job).__name__}, not an "
                        f"executor.runtime.job.Job")
    return job
