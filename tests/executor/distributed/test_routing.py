"""Routing of a rank's messages: the mailbox between its own stages, the wire to the others, and
the order check that messages matched by order (NCCL) need."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch

from executor.distributed.routing import RankTransport, chain_pairs, channels, order_problems
from executor.distributed.transport import DistTransport, _tag
from executor.runtime.interpreter import Packet
from executor.runtime.local import LocalTransport
from partitioner.schedule.generators import interleaved_1f1b, zbv
from partitioner.schedule.ir import Schedule, lower


class Wire:
    """Stands in for a stage's DistTransport: records what goes to other ranks."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int]] = []
        self.post_early = True

    def send_activation(self, stage: int, peer: int, microbatch: int, packet: Packet) -> None:
        self.calls.append(("SF", stage, peer, microbatch))

    def send_grad(self, stage: int, peer: int, microbatch: int, grads: Any) -> None:
        self.calls.append(("SB", stage, peer, microbatch))


def test_messages_between_stages_of_one_rank_stay_in_the_process() -> None:
    # zbv on 2 ranks: rank 1 holds stages 1 and 2, rank 0 stages 0 and 3
    wires = {1: Wire(), 2: Wire()}
    route = RankTransport(cast(dict[int, DistTransport], wires),
                          LocalTransport([torch.device("cpu")] * 4), stages=[1, 2])
    route.send_activation(1, 2, 0, Packet((torch.ones(2),), False))  # 1 -> 2: same rank
    route.send_activation(2, 3, 0, Packet((torch.ones(2),), False))  # 2 -> 3: rank 0
    route.send_grad(2, 1, 0, (torch.ones(2),))  # 2 -> 1: same rank
    route.send_grad(1, 0, 0, (torch.ones(2),))  # 1 -> 0: rank 0
    assert wires[1].calls == [("SB", 1, 0, 0)] and wires[2].calls == [("SF", 2, 3, 0)]
    assert torch.equal(route.recv_activation(2, 1, 0).tensors[0], torch.ones(2))
    assert torch.equal(route.recv_grad(1, 2, 0, ((torch.Size([2]), torch.float32),))[0],
                       torch.ones(2))
    assert [m[:3] for m in route.mailbox.sent] == [("F", 1, 2), ("B", 2, 1)]
    assert route.post_early


def test_only_pairs_across_ranks_get_a_channel_and_each_its_own_tags() -> None:
    sched = zbv(2, 3)  # placement (0, 1, 1, 0)
    ranks = [sched.rank_of[k] for k in range(4)]
    wires = channels(ranks, chain_pairs(4), "group", 60.0, "gloo", ordered=False)
    assert sorted(wires) == [(0, 1), (1, 0), (2, 3), (3, 2)]  # not (1, 2), (2, 1): rank 1's own
    assert set(wires.values()) == {"group"}
    # interleaved on 2 ranks: stages 0->1 and 2->3 both go from rank 0 to rank 1, on one group
    inter = interleaved_1f1b(2, 2, 3)
    pairs = sorted(channels(list(inter.rank_of), chain_pairs(4), None, 60.0, "gloo", False))
    tags = {_tag(j, len(pairs), i, part) for j in range(len(pairs)) for i in range(3)
            for part in range(4)}
    assert len(tags) == len(pairs) * 3 * 4  # unique per (pair, micro-batch, part)
    with pytest.raises(ValueError, match="beyond the backend's"):
        _tag(3, 4096, 2**19, 0)


def test_the_order_check_names_a_pair_whose_two_ends_disagree() -> None:
    assert order_problems(lower(interleaved_1f1b(2, 2, 4)), chain_pairs(4)) == []
    assert order_problems(lower(zbv(2, 4)), chain_pairs(4)) == []
    swapped = lower(Schedule.parse("0: 0F0 0F1 0B0 0B1\n1: 1F1 1F0 1B1 1B0"))
    assert order_problems(swapped, chain_pairs(2)) == [
        "stage 0 sends its activations to stage 1 in micro-batch order [0, 1] but stage 1 "
        "receives them in order [1, 0]",
        "stage 1 sends its gradients to stage 0 in micro-batch order [1, 0] but stage 0 "
        "receives them in order [0, 1]"]
