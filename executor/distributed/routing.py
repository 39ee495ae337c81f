"""Where a rank's messages go: to a stage on the same rank by mailbox, to another rank's by wire.

    >>> import torch
    >>> from executor.runtime.interpreter import Packet
    >>> from executor.runtime.local import LocalTransport
    >>> here = RankTransport({}, LocalTransport([torch.device("cpu")] * 2), stages=[0, 1])
    >>> here.send_activation(0, 1, 0, Packet((torch.ones(2),), False))   # stage 0 -> 1, mb 0
    >>> here.recv_activation(1, 0, 0).tensors
    (tensor([1., 1.]),)

A rank runs every stage the schedule places on it (one interpreter each). A message between two
of them never leaves the process: it goes through an in-process mailbox (``LocalTransport``),
so no rank sends to itself and no group, tag or receive is spent on it; the schedule's row
already runs the send before its receive. A message to a stage on another rank goes through
the sending (or receiving) stage's ``DistTransport``, over the group of that stage pair
(``channels``). With the ordered transport (NCCL's, messages matched by order) the two ends of
each stage pair must run their sends and receives in one order; ``order_problems`` checks that
against the schedule before any message is sent.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from executor.distributed.transport import DistTransport
from executor.runtime.interpreter import Packet
from executor.runtime.local import LocalTransport
from partitioner.schedule.ir import Schedule

__all__ = ["RankTransport", "chain_pairs", "channels", "order_problems"]

_GROUPS: dict[tuple[Any, ...], tuple[Any, dict[tuple[int, int], Any]]] = {}


def chain_pairs(stages: int) -> list[tuple[int, int]]:
    """The (src, dst) stage pairs of a chain: each stage and its neighbours, both directions."""
    return [(k, k + 1) for k in range(stages - 1)] + [(k + 1, k) for k in range(stages - 1)]


def channels(stage_ranks: Sequence[int], pairs: Sequence[tuple[int, int]], group: Any,
             timeout_s: float, backend: str, ordered: bool) -> dict[tuple[int, int], Any]:
    """The group carrying messages from stage src to stage dst, keyed (src, dst), for each pair
    of ``pairs`` whose stages are on different ranks (``stage_ranks[k]``: the global rank of
    stage k). Matched by tag (gloo), the pipeline's own group carries everything. Matched by
    order (``ordered``: NCCL), each direction of each such pair gets its own group: one ordered
    stream per direction. Those are made once per world (every rank creates them all, in the
    same order, as torch.distributed requires) and reused by later runners."""
    crossing = [(s, d) for s, d in pairs if stage_ranks[s] != stage_ranks[d]]
    if not ordered:
        return {pair: group for pair in crossing}
    key: tuple[Any, ...] = (tuple(stage_ranks), *crossing)
    world = dist.group.WORLD
    if key in _GROUPS and _GROUPS[key][0] is world:  # the cache holds on to that world
        return _GROUPS[key][1]
    groups = {(s, d): dist.new_group(sorted((stage_ranks[s], stage_ranks[d])),
                                     timeout=timedelta(seconds=timeout_s), backend=backend)
              for s, d in crossing}
    _GROUPS[key] = (world, groups)
    return groups


def order_problems(schedule: Schedule, pairs: Collection[tuple[int, int]]) -> list[str]:
    """For messages matched by order: each stage pair (src, dst) of ``pairs`` whose sender
    sends its micro-batches in another order than the receiver receives them (activations:
    the order of the two stages' forwards; gradients: of their backwards)."""
    order: dict[tuple[str, int], list[int]] = {}
    for row in schedule.actions:
        for a in row:
            order.setdefault((a.kind, a.stage), []).append(a.microbatch)
    problems = []
    for src, dst in sorted(pairs):
        kinds = ("SF", "RF") if src < dst else ("SB", "RB")
        sent, got = order.get((kinds[0], src), []), order.get((kinds[1], dst), [])
        if sent != got:
            what = "activations" if src < dst else "gradients"
            problems.append(f"stage {src} sends its {what} to stage {dst} in micro-batch order "
                            f"{sent} but stage {dst} receives them in order {got}")
    return problems


class RankTransport:
    """The transport of the stages ``stages`` of one rank: a message between two of them goes
    through ``mailbox``, any other through the local stage's transport ``remote[k]``."""

    def __init__(self, remote: Mapping[int, DistTransport], mailbox: LocalTransport,
                 stages: Collection[int]) -> None:
        self.remote, self.mailbox, self.here = dict(remote), mailbox, frozenset(stages)

    @property
    def post_early(self) -> bool:
        """Whether receives from other ranks are posted ahead (gloo's way)."""
        return all(t.post_early for t in self.remote.values())

    def begin_step(self, microbatches: int, training: bool) -> None:
        self.mailbox.sent.clear()  # its log is of one step
        for t in self.remote.values():
            t.begin_step(microbatches, training)

    def finish(self) -> None:
        """Wait until every send of the step to another rank has been delivered."""
        for t in self.remote.values():
            t.finish()

    def _via(self, stage: int, peer: int) -> DistTransport | LocalTransport:
        return self.mailbox if peer in self.here else self.remote[stage]

    def send_activation(self, stage: int, peer: int, microbatch: int, packet: Packet) -> None:
        self._via(stage, peer).send_activation(stage, peer, microbatch, packet)

    def recv_activation(self, stage: int, peer: int, microbatch: int) -> Packet:
        return self._via(stage, peer).recv_activation(stage, peer, microbatch)

    def send_grad(self, stage: int, peer: int, microbatch: int,
                  grads: tuple[torch.Tensor, ...]) -> None:
        self._via(stage, peer).send_grad(stage, peer, microbatch, grads)

    def recv_grad(self, stage: int, peer: int, microbatch: int,
                  like: tuple[tuple[torch.Size, torch.dtype], ...]) -> tuple[torch.Tensor, ...]:
        return self._via(stage, peer).recv_grad(stage, peer, microbatch, like)
