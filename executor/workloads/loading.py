"""Any model the ``profile`` command names, with a sample: built-ins, examples, or user factories.

    >>> model, sample, info = load_any_model("tiny-unet", 2)
    >>> type(model).__name__, tuple(sample.shape), info["kind"]
    ('UNet', (2, 3, 32, 32), 'images')

A name is a built-in chain (``executor.workloads.models.MODELS``), an example graph model
(``executor.workloads.graphmodels.GRAPH_MODELS``) or ``module:function``: a function of no
arguments returning an ``nn.Module``, or ``(model, sample)``. A model that comes without a
sample gets one of ``batch`` rows: ``sample_fn(batch)`` when given (``--sample``); else, for
a Transformers model (it has a ``.config``), by its ``main_input_name``: ``input_ids``
random in [0, vocab_size) of shape (batch, seq_len), or ``pixel_values`` of shape (batch,
num_channels, image_size, image_size) (image_size 224 when the config has none); else random
floats of shape (batch, *input_shape) (``--input-shape``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from executor.graphs.blocks import Leaf
from executor.workloads.graphmodels import GRAPH_MODELS, build_graph_model
from executor.workloads.models import MODELS, build_model
from partitioner.formats.specs import is_spec, load_spec

__all__ = ["is_chain", "load_any_model", "make_sample", "resolve_leaves"]


def is_chain(model: object) -> bool:
    """Whether ``model`` is profiled child by child (an ``nn.Sequential``), not traced."""
    return isinstance(model, nn.Sequential)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def make_sample(model: nn.Module, batch: int, *, sample_fn: Callable[[int], Any] | None = None,
                seq_len: int = 32, input_shape: Sequence[int] | None = None,
                what: str = "the model") -> Any:
    """A sample of ``batch`` rows for ``model`` (see the module docstring).

        >>> make_sample(nn.Linear(3, 2), 4, input_shape=[3]).shape
        torch.Size([4, 3])
    """
    if sample_fn is not None:
        return sample_fn(batch)
    config = getattr(model, "config", None)
    if config is not None and input_shape is None:
        main = getattr(model, "main_input_name", "input_ids")
        if main == "input_ids":
            vocab = int(config.vocab_size)
            return {"input_ids": torch.randint(vocab, (batch, seq_len), generator=_generator())}
        if main == "pixel_values":
            channels = int(getattr(config, "num_channels", 3) or 3)
            image = getattr(config, "image_size", None) or 224
            h, w = (image, image) if isinstance(image, int) else tuple(image)[-2:]
            return {"pixel_values": torch.randn(batch, channels, h, w, generator=_generator())}
        raise ValueError(f"{what} is a Transformers model whose main input is {main!r}, not "
                         f"input_ids or pixel_values; give --sample module:function (called "
                         f"with the batch size, returning the sample)")
    if input_shape is None:
        raise ValueError(f"{what} ({type(model).__name__}) comes without a sample and is not a "
                         f"Transformers model; give --input-shape D1,D2,... (one sample's shape "
                         f"without the batch dimension, random floats) or --sample "
                         f"module:function (called with the batch size)")
    return torch.randn(batch, *input_shape, generator=_generator())


def _check_sample(sample: Any, spec: str) -> None:
    leaves = pytree.tree_leaves(sample)
    ok = isinstance(sample, (Tensor, tuple, dict)) and any(
        isinstance(t, Tensor) and t.dim() > 0 for t in leaves)
    if not ok:
        raise ValueError(f"--model {spec!r}: the sample batch is a {type(sample).__name__}; give "
                         f"a tensor, a tuple of positional tensors or a dict of keyword "
                         f"tensors whose first dimension is the batch")


def load_any_model(spec: str, batch: int, *, sample_spec: str | None = None, seq_len: int = 32,
                   input_shape: Sequence[int] | None = None
                   ) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The model ``spec`` names, its sample of ``batch`` rows (or ``sample_spec``'s), and a
    description of the input for the profile."""
    sample_fn = load_spec(sample_spec, "--sample") if sample_spec else None
    if sample_fn is not None and not callable(sample_fn):
        raise ValueError(f"--sample {sample_spec!r} names a {type(sample_fn).__name__}, not a "
                         f"function of the batch size")
    if spec in MODELS:
        work = build_model(spec, batch=batch)
        sample = sample_fn(batch) if sample_fn is not None else work.sample
        return work.model, sample, dict(work.input_info)
    if spec in GRAPH_MODELS:
        graph_work = build_graph_model(spec, batch=batch)
        sample = sample_fn(batch) if sample_fn is not None else graph_work.sample
        return graph_work.model, sample, dict(graph_work.input_info)
    if not is_spec(spec):
        raise ValueError(f"--model {spec!r} is neither a built-in model "
                         f"({', '.join([*MODELS, *GRAPH_MODELS])}) nor module:function; see "
                         f"--list-models")
    func = load_spec(spec, "--model")
    result = func() if callable(func) else None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        model, sample = result
        if sample_fn is not None:
            sample = sample_fn(batch)
    elif isinstance(result, nn.Module):
        model = result
        sample = make_sample(model, batch, sample_fn=sample_fn, seq_len=seq_len,
                             input_shape=input_shape, what=f"--model {spec!r}")
    else:
        raise ValueError(f"--model {spec!r} must name a function returning an nn.Module or "
                         f"(nn.Module, sample_batch), got {type(result).__name__}")
    _check_sample(sample, spec)
    return model, sample, {"source": spec}


def resolve_leaves(specs: Sequence[str]) -> list[Leaf]:
    """``--leaf`` values: ``module:Class`` (an nn.Module class) or a module-name pattern.

        >>> resolve_leaves(["torch.nn:Linear", "layers.*"])
        [<class 'torch.nn.modules.linear.Linear'>, 'layers.*']
    """
    leaves: list[Leaf] = []
    for spec in specs:
        if not is_spec(spec):
            leaves.append(spec)
            continue
        cls = load_spec(spec, "--leaf")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"--leaf {spec!r} is not an nn.Module class; name a module class "
                            f"(module:Class) or a pattern of module names (e.g. 'layers.*')")
        leaves.append(cls)
    return leaves
