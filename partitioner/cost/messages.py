"""What crosses between stages: per (src, dst) stage pair, the values sent and their bytes.

    >>> from partitioner import load_profile
    >>> msgs = stage_messages(load_profile("h200/gpt2-medium"), [0] * 13 + [1] * 13, 4)
    >>> list(msgs), msgs[0, 1].values
    ([(0, 1)], ('12',))

The rule of ``formats.values``: a value x of layer u goes from stage(u) to each other stage
that holds a consumer of x, once; a layer without ``outputs`` has one value named as the
layer. The executor sends exactly these values, in this order, and the planner costs them.
"""

from __future__ import annotations

from collections.abc import Sequence

from partitioner.cost.model import interpolate
from partitioner.formats.layers import assignment_problems, layer_edges
from partitioner.formats.profile import Profile
from partitioner.formats.values import Message, profile_values

__all__ = ["Message", "stage_messages"]


def stage_messages(profile: Profile, stage_of: Sequence[int],
                   microbatch_size: float) -> dict[tuple[int, int], Message]:
    """Everything stage src sends stage dst forward per micro-batch of ``microbatch_size``
    samples, keyed (src, dst) in increasing order; pairs with nothing to send are absent.
    Raises ValueError unless ``stage_of`` is a convex partition of the layer graph."""
    stages = max(stage_of, default=-1) + 1
    problems = assignment_problems(profile.num_layers, layer_edges(profile), stage_of, stages)
    if problems:
        raise ValueError(f"not a convex partition into K={stages} stages:\n  "
                         + "\n  ".join(problems))
    vals = profile_values(profile)
    size = interpolate(vals.table, profile.microbatch_sizes, microbatch_size)
    names: dict[tuple[int, int], list[str]] = {}
    sent: dict[tuple[int, int], list[float]] = {}
    for x, val in enumerate(vals.values):
        src = stage_of[val.producer]
        for dst in sorted({stage_of[v] for v in val.consumers} - {src}):
            names.setdefault((src, dst), []).append(val.name)
            total = sent.setdefault((src, dst), [0.0, 0.0])
            total[0] += float(size[x])
            total[1] += float(size[x]) if val.grad else 0.0
    return {pair: Message(tuple(names[pair]), *sent[pair]) for pair in sorted(names)}
