"""Scatter and gather of micro-batches: uneven sizes, tuples, and the checks on a batch."""

from __future__ import annotations

import pytest
import torch

from executor.runtime.batch import as_tuple, batch_size, check_batch, gather, move, scatter
from partitioner.cost.model import split_microbatches


def test_scatter_gather_round_trip_uneven_tuples() -> None:
    x = (torch.arange(10).reshape(10, 1), torch.randn(10, 3))
    sizes = split_microbatches(10, 4)
    parts = scatter(x, sizes)
    assert [batch_size(p) for p in parts] == [3, 3, 2, 2]
    assert all(isinstance(p, tuple) and len(p) == 2 for p in parts)
    back = gather(parts)
    assert isinstance(back, tuple) and all(torch.equal(a, b) for a, b in zip(back, x,
                                                                               strict=True))
    single = scatter(torch.arange(5), [3, 2])
    assert isinstance(single[0], torch.Tensor) and torch.equal(gather(single), torch.arange(5))
    assert as_tuple(torch.ones(1))[0].shape == (1,)
    assert move(x, torch.device("cpu"))[0] is x[0]


def test_check_batch_names_the_problem() -> None:
    assert isinstance(check_batch([torch.ones(2), torch.ones(2, 3)], "inputs"), tuple)
    with pytest.raises(TypeError, match="inputs must be a tensor or a tuple of tensors, got "
                                        "tuple of int"):
        check_batch((torch.ones(2), 3), "inputs")
    with pytest.raises(ValueError, match="same batch size along dim 0, got sizes \\[2, 3\\]"):
        check_batch((torch.ones(2), torch.ones(3)), "targets")
    with pytest.raises(ValueError, match="sizes \\[None\\]"):
        check_batch(torch.tensor(1.0), "inputs")
