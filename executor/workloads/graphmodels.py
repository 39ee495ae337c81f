"""Example models that are not chains: tiny Transformers models and a U-Net with long skips.

    >>> w = build_graph_model("tiny-unet", batch=2)
    >>> out = w.model(w.sample)
    >>> tuple(out.shape), w.loss_fn(out, w.target).item() > 0
    ((2, 3, 32, 32), True)

Each builder gives a ``GraphWorkload``: the model, a sample of batch b (a tensor, or a dict of
keyword tensors such as BERT's ``attention_mask``), targets of batch b, and
``loss_fn(output, targets)`` taking the output as the model returns it (a tensor, or a
Transformers ``ModelOutput`` with ``logits``), the mean over samples and tokens. The
Transformers models (``tiny-gpt2`` with its LM head tied to the token embedding,
``tiny-llama``, ``tiny-bert``, ``tiny-resnet``) need the optional ``transformers`` package
(``pip install gpipe-planner[models]``), imported only when one is built; ``tiny-unet`` is
plain PyTorch. Dropout is off, so a pipelined step can be compared with the plain model's
exactly (dropout's masks depend on the order of the random draws, which micro-batching
changes).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GRAPH_MODELS", "GraphWorkload", "UNet", "build_graph_model", "transformers_module"]


@dataclass(frozen=True)
class GraphWorkload:
    """A model of any structure with a sample of ``batch`` rows, its targets and its loss."""

    name: str
    model: nn.Module
    sample: Any  # a tensor, a tuple of positional tensors or a dict of keyword tensors
    target: Tensor
    loss_fn: Callable[[Any, Tensor], Tensor]
    input_info: dict[str, Any] = field(default_factory=dict)


def transformers_module() -> Any:
    """The ``transformers`` package; ImportError naming the extra to install when missing."""
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError(f"this model needs the Transformers library, which is not installed "
                          f"({exc}); install it with: pip install gpipe-planner[models]"
                          ) from None


def _logits(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits


def lm_loss(output: Any, target: Tensor) -> Tensor:
    """Cross-entropy of the logits (b, seq, vocab) against the next tokens (b, seq), mean."""
    logits = _logits(output)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def class_loss(output: Any, target: Tensor) -> Tensor:
    """Cross-entropy of logits (b, classes) (or (b, classes, H, W)) against labels, mean."""
    return F.cross_entropy(_logits(output).float(), target)


def _tokens(vocab: int, batch: int, seq: int) -> tuple[Tensor, Tensor]:
    stream = torch.randint(vocab, (batch, seq + 1))  # the target is the input shifted by one
    return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()


def _tiny_gpt2(name: str, batch: int) -> GraphWorkload:
    tf = transformers_module()
    config = tf.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=3, n_head=2,
                           bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids, target = _tokens(config.vocab_size, batch, 16)
    return GraphWorkload(name, tf.GPT2LMHeadModel(config), ids, target, lm_loss,
                         {"kind": "tokens", "vocab": config.vocab_size, "seq": 16})


def _tiny_llama(name: str, batch: int) -> GraphWorkload:
    tf = transformers_module()
    config = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=64, tie_word_embeddings=False)
    ids, target = _tokens(config.vocab_size, batch, 16)
    return GraphWorkload(name, tf.LlamaForCausalLM(config), ids, target, lm_loss,
                         {"kind": "tokens", "vocab": config.vocab_size, "seq": 16})


def _tiny_bert(name: str, batch: int) -> GraphWorkload:
    tf = transformers_module()
    config = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=64, num_labels=3,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = torch.randint(config.vocab_size, (batch, 16))
    mask = torch.ones(batch, 16, dtype=torch.int64)
    mask[:, 12:] = 0  # the last tokens are padding
    sample = {"input_ids": ids, "attention_mask": mask}
    return GraphWorkload(name, tf.BertForSequenceClassification(config), sample,
                         torch.randint(config.num_labels, (batch,)), class_loss,
                         {"kind": "tokens", "vocab": config.vocab_size, "seq": 16,
                          "classes": config.num_labels})


def _tiny_resnet(name: str, batch: int) -> GraphWorkload:
    tf = transformers_module()
    config = tf.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                             depths=[2, 2], layer_type="basic", num_labels=5)
    return GraphWorkload(name, tf.ResNetForImageClassification(config),
                         torch.randn(batch, 3, 32, 32), torch.randint(5, (batch,)), class_loss,
                         {"kind": "images", "channels": 3, "height": 32, "width": 32,
                          "classes": 5})


# -- a U-Net: 3 down blocks, a bottleneck, 3 up blocks that concatenate the encoder's outputs --

class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by BatchNorm and an in-place ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)  # type: ignore[no-any-return]


class Down(nn.Module):
    """A ConvBlock at this resolution; the encoder pools before the next one."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.block = ConvBlock(cin, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)  # type: ignore[no-any-return]


class Up(nn.Module):
    """Upsample (b, cin, h, w) x2, concatenate the encoder's (b, skip, 2h, 2w), ConvBlock."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.block = ConvBlock(cin // 2 + skip, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))  # type: ignore[no-any-return]


class UNet(nn.Module):
    """(b, 3, H, W) images -> (b, classes, H, W) logits; H and W divisible by 8.

        >>> UNet(width=4)(torch.ones(1, 3, 16, 16)).shape
        torch.Size([1, 3, 16, 16])
    """

    def __init__(self, channels: int = 3, classes: int = 3, width: int = 8) -> None:
        super().__init__()
        w = width
        # lists of repeated blocks: each block is a layer of the traced graph by default
        self.downs = nn.ModuleList([Down(channels, w), Down(w, 2 * w), Down(2 * w, 4 * w)])
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(4 * w, 8 * w)
        self.ups = nn.ModuleList([Up(8 * w, 4 * w, 4 * w), Up(4 * w, 2 * w, 2 * w),
                                  Up(2 * w, w, w)])
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, down in enumerate(self.downs):
            x = down(self.pool(x) if i else x)
            skips.append(x)
        x = self.bottleneck(self.pool(x))
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            x = up(x, skip)  # the long skips: encoder level 3, 2, 1 into decoder 1, 2, 3
        return self.head(x)  # type: ignore[no-any-return]


def _tiny_unet(name: str, batch: int) -> GraphWorkload:
    return GraphWorkload(name, UNet(3, 3, 8), torch.randn(batch, 3, 32, 32),
                         torch.randint(3, (batch, 32, 32)), class_loss,
                         {"kind": "images", "channels": 3, "height": 32, "width": 32,
                          "classes": 3})


#: name -> (builder taking (name, batch), one-line description)
GRAPH_MODELS: dict[str, tuple[Callable[[str, int], GraphWorkload], str]] = {
    "tiny-gpt2": (_tiny_gpt2, "Transformers GPT2LMHeadModel, 3 blocks, d=32, 16 tokens, vocab "
                              "128, LM head tied to the token embedding (needs transformers)"),
    "tiny-llama": (_tiny_llama, "Transformers LlamaForCausalLM, 3 layers, d=32, GQA 2/1 heads, "
                                "16 tokens, vocab 128 (needs transformers)"),
    "tiny-bert": (_tiny_bert, "Transformers BertForSequenceClassification, 3 layers, d=32, "
                              "16 tokens with an attention mask, 3 labels (needs transformers)"),
    "tiny-resnet": (_tiny_resnet, "Transformers ResNetForImageClassification, 2 stages of 2 basic "
                                  "blocks, "
                                  "32x32 images, 5 classes (needs transformers)"),
    "tiny-unet": (_tiny_unet, "U-Net in plain PyTorch: 3 down blocks, bottleneck, 3 up blocks "
                              "with long skips, BatchNorm, 32x32 images, 3 classes"),
}


def build_graph_model(name: str, batch: int = 4, seed: int = 0) -> GraphWorkload:
    """Build an example graph model with a sample of ``batch`` rows, deterministically from
    ``seed`` and without touching the global random state."""
    if name not in GRAPH_MODELS:
        raise ValueError(f"unknown graph model {name!r}; the examples are: "
                         f"{', '.join(GRAPH_MODELS)}")
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch={batch!r} must be a whole number >= 1")
    builder, _ = GRAPH_MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(name, batch)
