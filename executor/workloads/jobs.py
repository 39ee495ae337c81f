"""Training jobs for the paper's two workloads, ready for ``partition-model run --job``.

    partition-model run --job executor.workloads.jobs:translation --plan plan.json --steps 30
    partition-model run --job executor.workloads.jobs:images --plan plan.json --steps 30

``translation`` trains the built-in ``gpt-text`` decoder on a parallel corpus (source and
target files, one sentence per line; see ``executor.workloads.datasets.ParallelText``) and ``images``
trains ``resnet-tiny`` on an image folder (one sub-folder per class). Both read their data from
``$GPIPE_DATA`` when it is set (``DIR/train.src`` + ``DIR/train.tgt``, or ``DIR/<class>/...``)
and otherwise generate the small synthetic set of ``executor.workloads.datasets`` (deterministically, so
every rank sees the same batches). Each rank builds only its own layers.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from executor.runtime.batch import Batch
from executor.runtime.job import Job
from executor.workloads.datasets import (
    ImageFolder,
    ParallelText,
    translation_loss,
    write_synthetic_image_folder,
    write_synthetic_parallel_text,
)
from executor.workloads.models import build_model

__all__ = ["batches_from", "demo", "images", "model_layers", "translation"]

TEXT_MODEL, IMAGE_MODEL = "gpt-text", "resnet-tiny"


def model_layers(name: str, seed: int = 0) -> Callable[[int, int], Sequence[nn.Module]]:
    """A factory of the built-in model's layers [start, end), initialised as ``build_model``
    does. (These models are small: the factory builds the whole model and keeps the range.)"""
    def build(start: int, end: int) -> Sequence[nn.Module]:
        model = build_model(name, batch=1, seed=seed).model
        return [model[i] for i in range(start, end)]
    return build


def batches_from(data: Dataset[tuple[torch.Tensor, object]]
                 ) -> Callable[[int, int], tuple[Batch, Batch]]:
    """``batch(step, B)``: the step's B consecutive samples of ``data``, wrapping around."""
    n = len(data)  # type: ignore[arg-type]

    def batch(step: int, size: int) -> tuple[Batch, Batch]:
        rows = [data[(step * size + j) % n] for j in range(size)]
        inputs = torch.stack([r[0] for r in rows])
        first = rows[0][1]
        labels = [r[1] for r in rows]
        targets = (torch.stack(labels) if isinstance(first, torch.Tensor)  # type: ignore[arg-type]
                   else torch.tensor(labels))
        return inputs, targets
    return batch


@cache
def _data_dir(kind: str) -> Path:
    env = os.environ.get("GPIPE_DATA")
    if env:
        return Path(env)
    root = Path(tempfile.mkdtemp(prefix=f"gpipe-{kind}-"))  # one per process: no races
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    if kind == "text":
        write_synthetic_parallel_text(root, sentences=512)
    else:
        write_synthetic_image_folder(root, classes=4, per_class=32, image_size=64)
    return root


def translation() -> Job:
    """``gpt-text`` on a parallel corpus (byte tokens, 64 per sample), Adam lr 3e-3."""
    root = _data_dir("text")
    data = ParallelText(root / "train.src", root / "train.tgt", seq_len=64)
    num_layers = len(build_model(TEXT_MODEL, batch=1).model)
    return Job(model_layers(TEXT_MODEL), num_layers, batches_from(data),
               translation_loss, lambda ps: torch.optim.Adam(ps, lr=3e-3))


def images() -> Job:
    """``resnet-tiny`` on an image folder (64x64, 10 outputs), Adam lr 3e-3."""
    data = ImageFolder(_data_dir("images"), image_size=64)
    num_layers = len(build_model(IMAGE_MODEL, batch=1).model)
    return Job(model_layers(IMAGE_MODEL), num_layers, batches_from(data),
               nn.functional.cross_entropy, lambda ps: torch.optim.Adam(ps, lr=3e-3))


def _demo_layer(i: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100 + i)
        widths = [(16, 64), None, (64, 64), None, (64, 64), None, (64, 1)]
        shape = widths[i]
        return nn.Linear(*shape) if shape else nn.GELU()


def _demo_batch(step: int, batch: int) -> tuple[Batch, Batch]:
    g = torch.Generator().manual_seed(step % 4)  # a small pool of batches, seen again and again
    x = torch.randn(batch, 16, generator=g)
    return x, torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]


def demo() -> Job:
    """A 7-layer MLP regressing a smooth function of random inputs (a demo that runs anywhere;
    the default job of ``partition-model run``)."""
    return Job(_demo_layer, 7, _demo_batch, nn.functional.mse_loss,
               lambda params: torch.optim.Adam(params, lr=3e-3))
