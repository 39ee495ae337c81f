"""Small models for the executor's tests, built layer by layer from seeded factories, so that a
rank building layers [start, end) gets exactly the layers of the plain model (the oracle)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MLP_LAYERS = 7
GPT_LAYERS = 5
VOCAB, SEQ, WIDTH = 32, 8, 16


def seeded(build: Callable[[int], nn.Module], seed: int = 1234) -> Callable[[int], nn.Module]:
    """A factory whose layer i is the same on every call and every rank (the global random
    state is left as it was)."""
    def factory(i: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            return build(i)
    return factory


def _mlp(i: int, p_drop: float) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 16),
                               nn.Dropout(p_drop), nn.GELU(), nn.Linear(16, 4)]
    return layers[i]


def mlp_layer(i: int) -> nn.Module:
    """Layer i of the MLP (dropout off: the oracle can match it exactly)."""
    return seeded(lambda j: _mlp(j, 0.0))(i)


def mlp_dropout_layer(i: int) -> nn.Module:
    return seeded(lambda j: _mlp(j, 0.5))(i)


def mlp(p_drop: float = 0.0) -> nn.Sequential:
    factory = mlp_dropout_layer if p_drop else mlp_layer
    return nn.Sequential(*(factory(i) for i in range(MLP_LAYERS)))


def mlp_batch(batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(batch, 8, generator=g), torch.randn(batch, 4, generator=g)


class Embed(nn.Module):
    """Token ids (b, T) -> (hidden (b, T, d), gate (b, T, 1), ids): two float tensors that both
    carry gradients and an integer one that does not."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Parameter(torch.randn(SEQ, WIDTH) * 0.1)
        self.gate = nn.Linear(WIDTH, 1)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.tokens(ids) + self.positions[: ids.shape[1]]
        return h, torch.sigmoid(self.gate(h)), ids


class Block(nn.Module):
    """Pre-LN causal self-attention and MLP, the attention scaled by the gate."""

    def __init__(self, p_drop: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(),
                                 nn.Linear(2 * WIDTH, WIDTH), nn.Dropout(p_drop))

    def forward(self, x: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h, gate, ids = x
        b, t, d = h.shape
        q, k, v = (z.view(b, t, 2, d // 2).transpose(1, 2)
                   for z in self.qkv(self.ln1(h)).split(d, dim=2))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // 2)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        h = h + gate * self.proj(y)
        return h + self.mlp(self.ln2(h)), gate, ids


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.lm = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB)

    def forward(self, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out: torch.Tensor = self.lm(self.ln(x[0]))
        return out


def _gpt(i: int, p_drop: float) -> nn.Module:
    return Embed() if i == 0 else Head() if i == GPT_LAYERS - 1 else Block(p_drop)


def gpt_layer(i: int) -> nn.Module:
    return seeded(lambda j: _gpt(j, 0.0))(i)


def gpt_dropout_layer(i: int) -> nn.Module:
    return seeded(lambda j: _gpt(j, 0.3))(i)


def gpt(p_drop: float = 0.0) -> nn.Sequential:
    factory = gpt_dropout_layer if p_drop else gpt_layer
    return nn.Sequential(*(factory(i) for i in range(GPT_LAYERS)))


def gpt_batch(batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    stream = torch.randint(VOCAB, (batch, SEQ + 1), generator=g)
    return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class Sleep(nn.Module):
    """Identity that sleeps a known time in forward (for timelines with known durations)."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ms = ms
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.ms / 1e3)
        return x * self.scale


class _Sleep(torch.autograd.Function):
    """Identity that sleeps ``fwd_s`` in its forward and ``bwd_s`` in its backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fwd_s: float, bwd_s: float) -> torch.Tensor:
        ctx.bwd_s = bwd_s
        time.sleep(fwd_s)
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.bwd_s)
        return grad, None, None


class SleepLayer(nn.Module):
    """A layer whose forward takes ``fwd_ms`` and whose backward takes ``bwd_ms``."""

    def __init__(self, fwd_ms: float, bwd_ms: float) -> None:
        super().__init__()
        self.fwd_s, self.bwd_s = fwd_ms / 1000, bwd_ms / 1000
        self.scale = nn.Parameter(torch.ones(1))  # so even the first layer has a backward

    def sleep(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _Sleep.apply(x * self.scale, self.fwd_s, self.bwd_s)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sleep(x)


class _RowSleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fwd_s: float, bwd_s: float) -> torch.Tensor:
        ctx.bwd_s = bwd_s * x.shape[0]
        time.sleep(fwd_s * x.shape[0])
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.bwd_s)
        return grad, None, None


class RowSleep(nn.Module):
    """A layer whose forward sleeps ``fwd_ms`` and backward ``bwd_ms`` per row of its input:
    known costs, proportional to the micro-batch size as a synthetic profile scales them."""

    def __init__(self, fwd_ms: float, bwd_ms: float) -> None:
        super().__init__()
        self.fwd_s, self.bwd_s = fwd_ms / 1e3, bwd_ms / 1e3
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _RowSleep.apply(x, self.fwd_s, self.bwd_s)
        return out * self.scale


#: per-row (fwd_ms, bwd_ms) of the sleep job's layers; the first layer's input is data, so
#: autograd runs no backward of its own (as the profiler measures it: input_grad=False)
SLEEP_MS = [(1.0, 0.0), (2.0, 1.0), (1.5, 1.5), (0.5, 3.0)]


def sleep_job() -> Any:
    """A job of RowSleep layers (``SLEEP_MS``): its actions take known times."""
    from executor.runtime.job import Job

    def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(size, 4), torch.zeros(size, 4)

    return Job(lambda i: RowSleep(*SLEEP_MS[i]), len(SLEEP_MS), batch, F.mse_loss)


class _Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("layer 5 broke")


def failing_job() -> Any:
    """The demo MLP with layer 5 replaced by one that raises in its forward (stage 1 of the
    plan [0, 3, 7])."""
    from executor.workloads.jobs import demo

    job = demo()
    layers = job.layers
    assert not isinstance(layers, nn.Sequential)
    return replace(job, layers=lambda i: _Broken() if i == 5 else layers(i))  # type: ignore[call-arg]


def dying_demo_job() -> Any:
    """The demo job (Adam), but rank 1 kills itself (SIGKILL) as it draws the batch of step
    ``$GPIPE_TEST_DIE_AT`` (unset: it never dies): a crash between two steps."""
    import os
    import signal

    import torch.distributed as dist

    from executor.workloads.jobs import demo

    job = demo()
    die_at = int(os.environ.get("GPIPE_TEST_DIE_AT", "-1"))

    def batch(step: int, size: int) -> Any:
        if step == die_at and dist.is_initialized() and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return job.batch(step, size)

    return replace(job, batch=batch)
