"""Training jobs of the example graph models, for ``partition-model run`` and the benchmarks.

    partition-model profile --model tiny-llama -o llama.json
    partition-model --profile llama.json --stages 2 -B 8 -M 4 -o plan.json
    partition-model run --job executor.workloads.graphjobs:tiny_llama --plan plan.json --steps 20

Each rank builds the model on the meta device (no memory, no initialisation), traces it there
and loads only its own stage's parameters from a weights file (``executor.graphs.weights``):
``$GPIPE_WEIGHTS`` when set, else the example model's seeded weights, written once to a cache
folder (atomically, so ranks that start together agree). Batches are a few fixed ones of the
example's data, drawn in turn, so the loss falls within a few steps.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from executor.graphs.weights import save_weights
from executor.runtime.job import Job
from executor.workloads.graphmodels import GRAPH_MODELS, build_graph_model

__all__ = ["graph_job", "tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_resnet", "tiny_unet"]

_BATCHES = 4  # distinct batches the job cycles through


def _weights(name: str) -> str:
    if os.environ.get("GPIPE_WEIGHTS"):
        return os.environ["GPIPE_WEIGHTS"]
    path = Path(tempfile.gettempdir()) / f"gpipe-{os.getuid()}" / f"{name}-seed0.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_weights(build_graph_model(name, batch=1).model, tmp)
        os.replace(tmp, path)
    return str(path)


def graph_job(name: str) -> Job:
    """The job of example model ``name`` (one of ``GRAPH_MODELS``)."""
    if name not in GRAPH_MODELS:
        raise ValueError(f"unknown graph model {name!r}; the examples are: "
                         f"{', '.join(GRAPH_MODELS)}")
    with torch.device("meta"):
        model = build_graph_model(name, batch=1).model
    weights = _weights(name)
    sample = build_graph_model(name, batch=2).sample

    def batch(step: int, global_batch: int) -> tuple[object, object]:
        w = build_graph_model(name, batch=global_batch, seed=1 + step % _BATCHES)
        return w.sample, w.target

    loss_fn = build_graph_model(name, batch=1).loss_fn
    return Job(model, None, batch, loss_fn,
               optimizer=lambda ps: torch.optim.Adam(ps, lr=3e-3), sample=sample,
               weights=weights)


def tiny_gpt2() -> Job:
    return graph_job("tiny-gpt2")


def tiny_llama() -> Job:
    return graph_job("tiny-llama")


def tiny_bert() -> Job:
    return graph_job("tiny-bert")


def tiny_resnet() -> Job:
    return graph_job("tiny-resnet")


def tiny_unet() -> Job:
    return graph_job("tiny-unet")
