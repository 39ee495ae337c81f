"""Training state per parameter: weight, gradient and optimizer state, by dtype and optimizer.

    >>> bytes_per_param("float32", "adam"), dtype_bytes("torch.bfloat16")
    (16.0, 2)
"""

from __future__ import annotations

from partitioner.formats.assumptions import OPTIMIZERS
from partitioner.formats.profile import DTYPE_BYTES

__all__ = ["bytes_per_param", "dtype_bytes"]


def bytes_per_param(dtype: str, optimizer: str) -> float:
    """Training-state bytes per parameter: weight + gradient + optimizer state.

    - ``none``: weight and gradient in the model's dtype (2 x dtype bytes).
    - ``sgd``: plus one momentum buffer in the model's dtype (3 x).
    - ``adam``: plus two fp32 moments, plus an fp32 master copy when the model's dtype is
      narrower than fp32 (bf16: 2 + 2 + 4 + 4 + 4 = 16 bytes; fp32: 4 + 4 + 4 + 4 = 16 bytes).

        >>> bytes_per_param("bfloat16", "adam"), bytes_per_param("float32", "sgd")
        (16.0, 12.0)
    """
    width = float(dtype_bytes(dtype))
    if optimizer == "none":
        return 2 * width
    if optimizer == "sgd":
        return 3 * width
    if optimizer == "adam":
        master = 4.0 if width < 4 else 0.0
        return 2 * width + 8.0 + master
    raise ValueError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


def dtype_bytes(dtype: str) -> int:
    """Bytes of one element of ``dtype`` (``'bfloat16'`` or ``'torch.bfloat16'``)."""
    name = dtype.removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(
            f"dtype {dtype!r} is unknown; use one of {', '.join(sorted(DTYPE_BYTES))}"
        )
    return DTYPE_BYTES[name]
