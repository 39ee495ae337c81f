"""BatchNorm under micro-batches: deferred statistics equal the plain model's over the whole
mini-batch; re-materialisation does not update the running statistics twice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from executor.runtime.batchnorm import DeferredBatchNorm, is_recomputing, keep_running_stats
from executor.runtime.pipeline import Pipeline, manual_plan


def bn_model(momentum: float | None = 0.1) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=momentum), nn.ReLU(),
                         nn.Linear(6, 3), nn.BatchNorm1d(3, momentum=momentum), nn.Linear(3, 1))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("recompute", ["never", "always"])
def test_deferred_statistics_match_the_whole_batch(momentum: float | None,
                                                   recompute: str) -> None:
    model, plain = bn_model(momentum), bn_model(momentum)
    pipe = Pipeline(model, manual_plan([0, 3, 6], 3, 10, "1f1b", recompute),
                    deferred_batchnorm=True)
    for step in range(2):
        x, y = torch.randn(10, 4) * (step + 1) + 2, torch.randn(10, 1)
        pipe.train_step(x, y, nn.functional.mse_loss)
        plain(x)
    # layer 1 sees the same inputs as in the plain model; layer 4 does not (layer 1 normalised
    # each micro-batch with its own statistics), so only its update count can match
    torch.testing.assert_close(model[1].running_mean, plain[1].running_mean, rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(model[1].running_var, plain[1].running_var, rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == int(model[4].num_batches_tracked) == 2


def test_default_updates_per_microbatch_once_even_with_recompute() -> None:
    model, deferred = bn_model(), bn_model()
    x, y = torch.randn(10, 4) + 2, torch.randn(10, 1)
    Pipeline(model, manual_plan([0, 3, 6], 5, 10, "gpipe", "always")).train_step(
        x, y, nn.functional.mse_loss)
    Pipeline(deferred, manual_plan([0, 3, 6], 5, 10, "gpipe", "always"),
             deferred_batchnorm=True).train_step(x, y, nn.functional.mse_loss)
    assert int(model[1].num_batches_tracked) == 5  # one update per micro-batch, not 10
    assert not torch.allclose(model[1].running_mean, deferred[1].running_mean)


def test_keep_running_stats_restores_buffers_and_flags_recompute() -> None:
    bn = nn.BatchNorm1d(2)
    assert not is_recomputing()
    with keep_running_stats(bn):
        assert is_recomputing()
        bn(torch.randn(4, 2) + 5)
    assert not is_recomputing()
    assert torch.equal(bn.running_mean, torch.zeros(2)) and int(bn.num_batches_tracked) == 0
    hooks = DeferredBatchNorm(bn)
    hooks.remove()
    bn(torch.randn(4, 2))
    assert int(bn.num_batches_tracked) == 1
