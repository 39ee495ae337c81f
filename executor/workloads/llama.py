"""A Llama-style decoder as an ``nn.Sequential``: token embedding, pre-norm blocks, norm + head.

    >>> model = llama(vocab=64, seq=8, d_model=32, heads=4, kv_heads=2, ffn=48, layers=2)
    >>> x = torch.randint(64, (3, 8))
    >>> len(model), tuple(model(x).shape)
    (4, (3, 8, 64))

The shape of Llama 2 (Touvron et al., 2023): RMSNorm before attention and MLP, rotary position
embeddings on queries and keys, grouped-query attention (``kv_heads`` key/value heads shared by
``heads // kv_heads`` query heads each), a SwiGLU MLP of width ``ffn``, no biases, an untied
LM head. Every child takes and returns one tensor (each block computes its rotary angles from
the sequence length), so a pipeline may cut between any two layers. Written for planning:
built on the meta device (``build_model(..., device="meta")``) the 7B, 70B shapes take no
memory and profile on the meta device (``executor.profiling.meta``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LlamaBlock", "LlamaEmbed", "LlamaHead", "RMSNorm", "llama"]


class RMSNorm(nn.Module):
    """x / rms(x) x weight, over the last dimension."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        norm = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return norm.type_as(x) * self.weight


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of (batch, heads, seq, head_dim): pairs (first half, second half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaBlock(nn.Module):
    """x + attn(norm(x)) with rotary, grouped-query causal attention; then x + swiglu(norm(x))."""

    def __init__(self, d_model: int, heads: int, kv_heads: int, ffn: int,
                 rope_base: float = 10000.0) -> None:
        super().__init__()
        if d_model % heads or heads % kv_heads or (d_model // heads) % 2:
            raise ValueError(f"d_model={d_model}, heads={heads}, kv_heads={kv_heads}: heads must "
                             f"divide d_model into an even head size and kv_heads divide heads")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d_model // heads
        self.rope_base = rope_base
        self.attn_norm = RMSNorm(d_model)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.mlp_norm = RMSNorm(d_model)
        self.gate_up = nn.Linear(d_model, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, d_model, bias=False)

    def _angles(self, seq: int, like: Tensor) -> tuple[Tensor, Tensor]:
        inv = self.rope_base ** (-torch.arange(0, self.head_dim, 2, device=like.device,
                                               dtype=torch.float32) / self.head_dim)
        angles = torch.outer(torch.arange(seq, device=like.device, dtype=torch.float32), inv)
        return angles.cos().to(like.dtype), angles.sin().to(like.dtype)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = (z.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
                for z in self.kv(h).chunk(2, dim=-1))
        cos, sin = self._angles(t, x)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)  # type: ignore[no-any-return]


class LlamaEmbed(nn.Module):
    """Token ids (batch, seq) -> embeddings (batch, seq, d_model); positions are rotary."""

    def __init__(self, vocab: int, d_model: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)

    def forward(self, idx: Tensor) -> Tensor:
        return self.tokens(idx)  # type: ignore[no-any-return]


class LlamaHead(nn.Module):
    """Final RMSNorm and the LM head: (batch, seq, d_model) -> logits (batch, seq, vocab)."""

    def __init__(self, d_model: int, vocab: int) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.lm = nn.Linear(d_model, vocab, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm(self.norm(x))  # type: ignore[no-any-return]


def llama(vocab: int, seq: int, d_model: int, heads: int, kv_heads: int, ffn: int,
          layers: int) -> nn.Sequential:
    """A Llama decoder of ``layers + 2`` pipeline layers: LlamaEmbed, ``layers`` LlamaBlocks,
    LlamaHead (``seq`` is the context the blocks are built for; any length up to it runs)."""
    del seq  # rotary angles are computed for the sequence at hand
    return nn.Sequential(LlamaEmbed(vocab, d_model),
                         *(LlamaBlock(d_model, heads, kv_heads, ffn) for _ in range(layers)),
                         LlamaHead(d_model, vocab))
