"""A profile's optional ``loss``: what the loss function keeps for backward on the last stage.

    >>> from partitioner.formats.checks import Problems
    >>> p = Problems()
    >>> loss = parse_loss({"saved_bytes": [40, 80], "saved_input_bytes": [0, 0],
    ...                    "target_bytes": [8, 16]}, 2, p)
    >>> loss.saved_bytes, list(p), loss_to_json(loss)["target_bytes"]
    ((40.0, 80.0), [], [8, 16])

Per micro-batch size, like a layer's figures: ``saved_bytes``, the storages the loss saves for
backward (the targets' excluded); ``saved_input_bytes``, those of them that are the model's output
(which the last layer may save too); ``target_bytes``, the targets' bytes, which the last stage
holds for the whole step. A cross-entropy over a vocabulary keeps its log-softmax, as large as
the logits: on a language model the loss can hold more than a block does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from partitioner.formats.checks import Problems, show
from partitioner.formats.units import MAX_BYTES

__all__ = ["LOSS_KEYS", "LossProfile", "loss_to_json", "parse_loss"]

LOSS_KEYS = ("saved_bytes", "saved_input_bytes", "target_bytes")


@dataclass(frozen=True)
class LossProfile:
    """The loss's figures, one per micro-batch size of the profile."""

    saved_bytes: tuple[float, ...]
    saved_input_bytes: tuple[float, ...]
    target_bytes: tuple[float, ...]


def parse_loss(raw: object, n: int, problems: Problems) -> LossProfile:
    """The ``loss`` object of a profile with ``n`` micro-batch sizes (problems collected)."""
    obj: Mapping[str, Any] = problems.mapping(raw, "loss", ", ".join(LOSS_KEYS))
    problems.keys(obj, "loss", LOSS_KEYS, required=LOSS_KEYS)
    arrays = {}
    for key in LOSS_KEYS:
        arr = obj.get(key, [0] * n)
        if not isinstance(arr, list) or len(arr) != n:
            problems.add(f"loss.{key}", f"{show(arr)} is not a list of {n} numbers, one per "
                                        f"micro-batch size")
            arr = [0] * n
        arrays[key] = tuple(problems.number(x, f"loss.{key}[{j}]", high=MAX_BYTES)
                            for j, x in enumerate(arr))
    for j, (part, whole) in enumerate(zip(arrays["saved_input_bytes"], arrays["saved_bytes"],
                                          strict=True)):
        if part > whole:
            problems.add(f"loss.saved_input_bytes[{j}]", f"is {part:g} bytes, more than "
                                                         f"saved_bytes ({whole:g}) of which it "
                                                         f"is a part; give at most {whole:g}")
    return LossProfile(arrays["saved_bytes"], arrays["saved_input_bytes"],
                       arrays["target_bytes"])


def loss_to_json(loss: LossProfile) -> dict[str, list[float | int]]:
    """The JSON object of ``loss`` (whole numbers written as such)."""
    return {key: [int(x) if float(x).is_integer() else x for x in getattr(loss, key)]
            for key in LOSS_KEYS}
