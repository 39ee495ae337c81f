"""Samples of any model: resizing the batch dimension, and describing the inputs."""

from __future__ import annotations

import pytest
import torch

from executor.profiling.samples import describe_sample, resize_sample, sample_batch


def test_resize_tensor_tuple_and_dict() -> None:
    x = torch.arange(3).view(3, 1)
    assert resize_sample(x, 1).tolist() == [[0]]
    a, b = resize_sample((x, torch.ones(3, 2)), 4)
    assert a.flatten().tolist() == [0, 1, 2, 0] and b.shape == (4, 2)
    d = resize_sample({"ids": x, "table": torch.ones(5)}, 2)
    assert d["ids"].shape == (2, 1) and d["table"].shape == (5,)
    assert resize_sample(x, 3).data_ptr() != x.data_ptr()  # fresh storage


def test_describe_and_errors() -> None:
    info = describe_sample({"ids": torch.zeros(2, 7, dtype=torch.int64)}, {"kind": "tokens"})
    assert info == {"kind": "tokens",
                    "kwargs": {"ids": {"shape": [7], "dtype": "int64", "batched": True}}}
    with pytest.raises(TypeError, match="no tensor with a batch dimension"):
        sample_batch({"n": 3})
