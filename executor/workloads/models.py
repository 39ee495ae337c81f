"""Built-in models: a GPT-style Transformer and a ResNet-style classifier, as ``nn.Sequential``.

    >>> w = build_model("gpt-tiny", batch=2)
    >>> w.loss_fn(w.model(w.sample), w.target).dim(), len(w.model), w.sample.dtype
    (0, 6, torch.int64)

These mirror the two workload families of the GPipe paper (a Transformer for translation, a
convolutional network for image classification). Every child of the ``nn.Sequential`` takes and
returns one tensor, so a pipeline may cut between any two layers.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from executor.runtime.batch import Batch
from executor.workloads.graphmodels import GRAPH_MODELS
from executor.workloads.llama import llama
from partitioner.formats.specs import is_spec, load_spec

__all__ = [
    "DEFAULT_MODEL",
    "META_ONLY",
    "MODELS",
    "Workload",
    "build_model",
    "gpt",
    "list_models",
    "lm_loss",
    "load_model",
    "resnet",
]

#: The model the demo and the executor's tests use: it profiles and trains in seconds on 2 cores.
DEFAULT_MODEL = "gpt-text"


@dataclass(frozen=True)
class Workload:
    """A model with a sample batch to profile or train it on.

    ``sample`` (batch, ...) is the input of layer 0; ``target`` (batch, ...) is what ``loss_fn``
    compares the model's output with. ``loss_fn(output, target)`` is the mean over every sample
    (and token), so the mean of equal micro-batches' losses is the whole batch's loss.
    ``input_info`` describes the sample for a profile's ``input`` field.
    """

    name: str
    model: nn.Sequential
    sample: Tensor
    target: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    input_info: dict[str, Any] = field(default_factory=dict)


# -- GPT: token+position embedding, pre-LN blocks, final LayerNorm + LM head -------------------

class Embed(nn.Module):
    """Token ids (batch, seq) int64 -> token + position embeddings (batch, seq, d_model)."""

    def __init__(self, vocab: int, seq: int, d_model: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(seq, d_model)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.tokens(idx) + self.positions(pos)  # type: ignore[no-any-return]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where token t attends to tokens 0..t."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}; "
                             f"choose heads that divide d_model")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # each (b, t, d)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, d/heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # type: ignore[no-any-return]


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4x GELU MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))  # type: ignore[no-any-return]


class Head(nn.Module):
    """Final LayerNorm and the LM head: (batch, seq, d_model) -> logits (batch, seq, vocab)."""

    def __init__(self, d_model: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.lm = nn.Linear(d_model, vocab, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm(self.ln(x))  # type: ignore[no-any-return]


def gpt(vocab: int, seq: int, d_model: int, heads: int, layers: int) -> nn.Sequential:
    """A GPT decoder of ``layers + 2`` pipeline layers: Embed, ``layers`` Blocks, Head.

        >>> len(gpt(vocab=32, seq=8, d_model=16, heads=2, layers=3))
        5
    """
    return nn.Sequential(Embed(vocab, seq, d_model),
                         *(Block(d_model, heads) for _ in range(layers)),
                         Head(d_model, vocab))


def lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of logits (batch, seq, vocab) against next tokens (batch, seq), mean."""
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def _gpt_workload(name: str, batch: int, *, vocab: int, seq: int, d_model: int, heads: int,
                  layers: int) -> Workload:
    model = gpt(vocab, seq, d_model, heads, layers)
    stream = torch.randint(vocab, (batch, seq + 1))  # the target is the input shifted by one
    info = {"kind": "tokens", "vocab": vocab, "seq": seq, "d_model": d_model, "heads": heads,
            "blocks": layers}
    return Workload(name, model, stream[:, :-1].contiguous(), stream[:, 1:].contiguous(),
                    lm_loss, info)


# -- ResNet: stem, bottleneck blocks, pooled linear classifier ---------------------------------

class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, plus the shortcut (projected when shapes change)."""

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def resnet(blocks: tuple[int, ...] = (3, 4, 6, 3), width: int = 64,
           classes: int = 1000) -> nn.Sequential:
    """A ResNet flattened into pipeline layers: conv, bn, relu, maxpool, one layer per
    bottleneck, avgpool, flatten, fc (ResNet-50 with the defaults: 23 layers).

        >>> len(resnet(blocks=(1, 1), width=4, classes=10))
        9
    """
    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    in_ch = width
    for stage, count in enumerate(blocks):
        w = width * 2**stage
        for j in range(count):
            layers.append(Bottleneck(in_ch, w, 2 if j == 0 and stage > 0 else 1))
            in_ch = 4 * w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, classes)]
    return nn.Sequential(*layers)


def _resnet_workload(name: str, batch: int, *, blocks: tuple[int, ...], width: int,
                     classes: int, image: int) -> Workload:
    model = resnet(blocks, width, classes)
    info = {"kind": "images", "channels": 3, "height": image, "width": image,
            "classes": classes}
    return Workload(name, model, torch.randn(batch, 3, image, image),
                    torch.randint(classes, (batch,)), F.cross_entropy, info)


def _llama_workload(name: str, batch: int, *, vocab: int, seq: int, d_model: int, heads: int,
                    kv_heads: int, ffn: int, layers: int) -> Workload:
    model = llama(vocab, seq, d_model, heads, kv_heads, ffn, layers)
    stream = torch.randint(vocab, (batch, seq + 1))
    info = {"kind": "tokens", "vocab": vocab, "seq": seq, "d_model": d_model, "heads": heads,
            "kv_heads": kv_heads, "ffn": ffn, "blocks": layers}
    return Workload(name, model, stream[:, :-1].contiguous(), stream[:, 1:].contiguous(),
                    lm_loss, info)


# -- registry ----------------------------------------------------------------------------------

#: name -> (builder taking (name, batch), one-line description)
MODELS: dict[str, tuple[Callable[[str, int], Workload], str]] = {
    "gpt-tiny": (partial(_gpt_workload, vocab=256, seq=32, d_model=64, heads=4, layers=4),
                 "GPT, 4 blocks, d=64, 4 heads, 32 tokens, vocab 256 (0.2M params)"),
    "gpt-text": (partial(_gpt_workload, vocab=259, seq=64, d_model=128, heads=4, layers=6),
                 "GPT on byte tokens (vocab 259, the ParallelText data), 6 blocks, d=128, "
                 "64 tokens (1.3M params): the demo's model"),
    "gpt-small": (partial(_gpt_workload, vocab=4096, seq=128, d_model=256, heads=8, layers=6),
                  "GPT, 6 blocks, d=256, 8 heads, 128 tokens, vocab 4096 (6.8M params)"),
    "gpt2-small": (partial(_gpt_workload, vocab=50304, seq=1024, d_model=768, heads=12,
                           layers=12),
                   "GPT-2 small shape: 12 blocks, d=768, 1024 tokens, vocab 50304 (163M, head untied)"),
    "gpt2-medium": (partial(_gpt_workload, vocab=50304, seq=1024, d_model=1024, heads=16,
                            layers=24),
                    "GPT-2 medium shape: 24 blocks, d=1024, 1024 tokens, vocab 50304 (406M, head untied)"),
    "gpt-1.3b": (partial(_gpt_workload, vocab=50304, seq=1024, d_model=2048, heads=16,
                         layers=24),
                 "GPT 1.3B shape: 24 blocks, d=2048, 1024 tokens, vocab 50304"),
    "llama-tiny": (partial(_llama_workload, vocab=256, seq=32, d_model=64, heads=4, kv_heads=2,
                           ffn=160, layers=4),
                   "Llama, 4 blocks, d=64, GQA 4/2 heads, SwiGLU 160, 32 tokens, vocab 256"),
    "llama2-7b": (partial(_llama_workload, vocab=32000, seq=4096, d_model=4096, heads=32,
                          kv_heads=32, ffn=11008, layers=32),
                  "Llama 2 7B shape: 32 blocks, d=4096, 32 heads, SwiGLU 11008, 4096 tokens, "
                  "vocab 32000 (6.7B; meta device only)"),
    "llama2-70b": (partial(_llama_workload, vocab=32000, seq=4096, d_model=8192, heads=64,
                           kv_heads=8, ffn=28672, layers=80),
                   "Llama 2 70B shape: 80 blocks, d=8192, GQA 64/8 heads, SwiGLU 28672, 4096 "
                   "tokens, vocab 32000 (69B; meta device only)"),
    "gpt3-175b": (partial(_gpt_workload, vocab=50257, seq=2048, d_model=12288, heads=96,
                          layers=96),
                  "GPT-3 175B shape: 96 blocks, d=12288, 96 heads, 2048 tokens, vocab 50257 "
                  "(175B; meta device only)"),
    "resnet-tiny": (partial(_resnet_workload, blocks=(1, 1, 1, 1), width=8, classes=10,
                            image=64),
                    "ResNet, 4 bottlenecks, width 8, 64x64 images, 10 classes (0.1M params)"),
    "resnet-small": (partial(_resnet_workload, blocks=(2, 2, 2, 2), width=16, classes=100,
                             image=64),
                     "ResNet, 8 bottlenecks, width 16, 64x64 images, 100 classes (0.9M)"),
    "resnet50": (partial(_resnet_workload, blocks=(3, 4, 6, 3), width=64, classes=1000,
                         image=224),
                 "ResNet-50 shape: 16 bottlenecks, 224x224 images, 1000 classes (25.6M)"),
}


#: The shapes too large to build anywhere but on the meta device.
META_ONLY = frozenset({"llama2-7b", "llama2-70b", "gpt3-175b"})


def list_models() -> list[tuple[str, str]]:
    """(name, description) of every built-in model, e.g. ``('gpt-tiny', 'GPT, 4 blocks, ...')``,
    the chains then the example graph models (``executor.workloads.graphmodels``)."""
    return [(name, desc) for name, (_, desc) in (*MODELS.items(), *GRAPH_MODELS.items())]


def build_model(name: str, batch: int = 8, seed: int = 0,
                device: str | torch.device | None = None) -> Workload:
    """Build a built-in model with a sample batch of ``batch`` rows, deterministically from
    ``seed`` and without touching the global random state; on ``device`` when given (``meta``:
    shapes only, no memory, which the largest shapes require).

        >>> build_model("resnet-tiny", batch=3).sample.shape
        torch.Size([3, 3, 64, 64])
        >>> build_model("gpt3-175b", batch=1, device="meta").model[1].attn.qkv.weight.shape
        torch.Size([36864, 12288])
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; built-in models are: {', '.join(MODELS)} "
                         f"(or give module:function returning (nn.Sequential, sample_batch))")
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch={batch!r} must be a whole number >= 1")
    if name in META_ONLY and torch.device(device or "cpu").type != "meta":
        raise ValueError(f"{name} is a shape for planning ({MODELS[name][1].split('(')[-1][:-1]}"
                         f"): its weights fit no machine here; build it on the meta device "
                         f"(build_model(..., device='meta'), or partition-model profile "
                         f"--device meta --target h200)")
    builder, _ = MODELS[name]
    with torch.random.fork_rng(devices=[]), (
            torch.device(device) if device is not None else nullcontext()):
        torch.manual_seed(seed)
        return builder(name, batch)


def load_model(spec: str, batch: int) -> tuple[nn.Sequential, Batch, dict[str, Any]]:
    """A built-in name (built with ``batch`` sample rows) or ``module:function`` (a function of
    no arguments returning ``(nn.Sequential, sample_batch)``); returns the model, its sample
    batch and a description of the input for the profile.

        >>> model, sample, info = load_model("gpt-tiny", 2)
        >>> len(model), tuple(sample.shape), info["kind"]
        (6, (2, 32), 'tokens')
    """
    if spec in MODELS:
        work = build_model(spec, batch=batch)
        return work.model, work.sample, dict(work.input_info)
    if not is_spec(spec):
        raise ValueError(f"--model {spec!r} is neither a built-in model ({', '.join(MODELS)}) "
                         f"nor module:function; see --list-models")
    func = load_spec(spec, "--model")
    result = func() if callable(func) else None
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError(f"--model {spec!r} must name a function returning "
                         f"(nn.Sequential, sample_batch), got {type(result).__name__}")
    model, sample = result
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"--model {spec!r} returned a {type(model).__name__} as the model; the "
                         f"profiler needs an nn.Sequential of the pipeline's layers")
    if not (isinstance(sample, Tensor) or (isinstance(sample, tuple) and sample
                                           and all(isinstance(t, Tensor) for t in sample))):
        raise ValueError(f"--model {spec!r}: the sample batch is a {type(sample).__name__}; "
                         f"give a tensor or a tuple of tensors whose first dimension is the "
                         f"batch")
    return model, sample, {"source": spec}
