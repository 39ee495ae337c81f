"""A job that fails on purpose: the demo MLP with one fault injected, to test how a run ends.

    GPIPE_FAULT=backward-kill@1:3 partition-model run --job executor.workloads.faults:job \\
        --plan plan.json --steps 6 --checkpoint-dir ckpt     # rank 1 dies in step 3's backward

``GPIPE_FAULT=KIND@RANK:STEP`` (unset: no fault, the demo job itself) makes global rank RANK
fail in step STEP (counted from the run's first step, 0-based), in the first micro-batch:

- ``forward-kill``, ``backward-kill``: the process kills itself (SIGKILL) in the forward of
  its first layer, or in that layer's backward;
- ``send-kill``: it kills itself as it sends its first activation of that step;
- ``checkpoint-kill``: it kills itself in the middle of the checkpoint saved after that
  step (its part written, the checkpoint not yet committed);
- ``hang``: its first layer's forward sleeps for an hour;
- ``wrong-shape``: the last layer of its stage sends an output one column wider.

The fault fires in the process's own count of steps: a run resumed from a checkpoint and
started without ``GPIPE_FAULT`` runs clean.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from executor.runtime.job import Job
from executor.workloads.jobs import demo

__all__ = ["KINDS", "job", "parse_fault"]

KINDS = ("forward-kill", "backward-kill", "send-kill", "checkpoint-kill", "hang",
         "wrong-shape")


def parse_fault(spec: str) -> tuple[str, int, int]:
    """``KIND@RANK:STEP`` as (kind, rank, step).

        >>> parse_fault("hang@1:2")
        ('hang', 1, 2)
    """
    try:
        kind, rest = spec.split("@")
        rank, step = (int(x) for x in rest.split(":"))
    except ValueError:
        raise ValueError(f"GPIPE_FAULT={spec!r} is not KIND@RANK:STEP, e.g. "
                         f"backward-kill@1:3") from None
    if kind not in KINDS or rank < 0 or step < 0:
        raise ValueError(f"GPIPE_FAULT={spec!r}: KIND is one of {', '.join(KINDS)}, RANK and "
                         f"STEP whole numbers >= 0")
    return kind, rank, step


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _KillInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        _die()
        return grad


class _Fault:
    """A forward hook that, on the faulty rank, in the faulty step's first micro-batch, fails
    as ``kind`` says: a kill or a hang in the rank's first layer (the first to run), a wrong
    shape out of its last one (whose output is sent). A hook leaves the layer's parameter
    names as they are, so the run's checkpoints load into the clean job."""

    def __init__(self, kind: str, rank: int, step: int) -> None:
        self.kind, self.rank, self.step = kind, rank, step
        self.seen = -1  # the last step whose first forward this layer ran
        _BUILT.append(self)

    def __call__(self, module: nn.Module, inputs: Any, y: torch.Tensor) -> torch.Tensor:
        if dist.get_rank() != self.rank or self.seen == _STEP[0]:
            return y
        self.seen = _STEP[0]
        if _STEP[0] != self.step:
            return y
        if self.kind == "forward-kill":
            _die()
        if self.kind == "hang":
            time.sleep(3600)
        if self.kind == "backward-kill":
            return _KillInBackward.apply(y)  # type: ignore[no-untyped-call,no-any-return]
        if self.kind == "wrong-shape" and self is _BUILT[-1]:
            return torch.cat([y, y[:, :1]], dim=1)
        return y


_BUILT: list[_Fault] = []  # this process's fault hooks, in the order their layers were built
_STEP = [-1]  # the step this process is in (its batch was drawn last)


def _patch_send(rank: int, step: int) -> None:
    from executor.distributed import transport

    for name in ("send_activation", "send_grad"):  # the last stage sends only gradients
        send = getattr(transport.DistTransport, name)

        def send_or_die(self: Any, *args: Any, _send: Any = send, **kwargs: Any) -> None:
            if _STEP[0] == step and dist.get_rank() == rank:
                _die()
            _send(self, *args, **kwargs)

        setattr(transport.DistTransport, name, send_or_die)


def _patch_checkpoint(rank: int, step: int) -> None:
    from executor.distributed import checkpoint

    save = getattr(checkpoint, "dcp_save")  # noqa: B009 - imported there, not exported

    def save_and_die(*args: Any, **kwargs: Any) -> Any:
        out = save(*args, **kwargs)
        if _STEP[0] == step and dist.get_rank() == rank:
            _die()  # its part written, the checkpoint not committed
        return out

    setattr(checkpoint, "dcp_save", save_and_die)  # noqa: B010


def job() -> Job:
    """The demo job (``executor.workloads.jobs.demo``) with ``$GPIPE_FAULT`` injected."""
    base = demo()
    spec = os.environ.get("GPIPE_FAULT")
    if not spec:
        return base
    kind, rank, step = parse_fault(spec)
    layers = base.layers
    assert callable(layers) and not isinstance(layers, nn.Module)
    if kind == "send-kill":
        _patch_send(rank, step)
    elif kind == "checkpoint-kill":
        _patch_checkpoint(rank, step)

    def layer(*where: int) -> nn.Module:
        built = layers(*where)
        assert isinstance(built, nn.Module), "the demo builds one layer per call"
        if kind not in ("send-kill", "checkpoint-kill"):
            built.register_forward_hook(_Fault(kind, rank, step))
        return built

    def batch(s: int, size: int) -> Any:
        _STEP[0] = s
        return base.batch(s, size)

    return replace(base, layers=layer, batch=batch)
