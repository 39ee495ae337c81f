"""The ring all-reduce formula, the replicas' share of the batch and sharded optimizer state."""

from __future__ import annotations

import pytest

from partitioner.cost.allreduce import ring_allreduce_ms
from partitioner.cost.model import CostModel, bytes_per_param
from partitioner.formats.assumptions import LINKS, Link
from tests.synthetic import make_profile


@pytest.mark.parametrize("ranks", [2, 3, 8, 64])
def test_ring_allreduce_is_the_closed_form(ranks: int) -> None:
    link = Link(25.0, 0.003)
    n_bytes = 7.5e8
    expected = 2 * (ranks - 1) / ranks * n_bytes / (25.0 * 1e6) + 2 * (ranks - 1) * 0.003
    assert ring_allreduce_ms(n_bytes, ranks, link) == pytest.approx(expected, rel=1e-12)


def test_ring_allreduce_of_one_rank_or_no_bytes_or_a_free_link() -> None:
    assert ring_allreduce_ms(1e9, 1, LINKS["ib"]) == 0.0
    assert ring_allreduce_ms(0.0, 8, LINKS["ib"]) == 0.0
    assert ring_allreduce_ms(1e9, 8, LINKS["free"]) == 0.0


def test_ib_preset_is_ndr_400() -> None:
    assert LINKS["ib"] == Link(50.0, 0.005)


def _profile() -> CostModel:
    prof = make_profile([1.0] * 4, param_bytes=[10**6] * 4, saved_bytes=[100.0] * 4,
                        out_bytes=[10.0] * 4, sizes=(1, 2), dtype="bfloat16")
    return CostModel(prof, 16, 4, stages=2)


def test_replicas_shrink_the_microbatch_and_the_activations() -> None:
    base = _profile()
    assert base.microbatch_size == 4
    two = CostModel(base.profile, 16, 4, stages=2, replicas=2)
    assert (two.replica_batch, two.microbatch_size) == (8, 2)
    state = float(base.param_state_bytes()[0:2].sum())
    # activations scale with b (the profile is linear in b): half the share, half the bytes
    act_one = base.stage_memory_bytes(0, 2, 0) - state
    act_two = two.stage_memory_bytes(0, 2, 0) - state
    assert act_two == pytest.approx(act_one / 2)
    assert act_one > 0


def test_sharded_optimizer_keeps_a_dth_of_the_optimizer_state() -> None:
    base = _profile()
    d = 4
    sharded = CostModel(base.profile, 16, 4, stages=2, replicas=d, shard_optimizer=True)
    whole = CostModel(base.profile, 16, 4, stages=2, replicas=d)
    per = bytes_per_param("bfloat16", "adam")  # 16 bytes: 2 weight + 2 grad + 12 optimizer
    params = 10**6 / 2  # bf16: 2 bytes each
    assert float(whole.param_state_bytes()[0]) == params * per
    assert float(sharded.param_state_bytes()[0]) == params * (4 + 12 / d)
    # D = 1 with sharding asked: nothing to shard over
    assert float(CostModel(base.profile, 16, 4, shard_optimizer=True).param_state_bytes()[0]) \
        == params * per


def test_uneven_share_and_bad_replicas_are_refused_with_the_fix() -> None:
    prof = _profile().profile
    with pytest.raises(ValueError, match=r"B=10 does not split into D=4 .*multiple of 4"):
        CostModel(prof, 10, 1, replicas=4)
    with pytest.raises(ValueError, match=r"replicas D=0 must be a whole number >= 1"):
        CostModel(prof, 10, 1, replicas=0)
    with pytest.raises(ValueError, match=r"D=2 replicas gets B/D=4 samples, fewer than M=5 "
                                         r".*use M <= 4"):
        CostModel(prof, 8, 5, replicas=2)
