"""A profile as a table: what ``partition-model profile`` prints after measuring a model.

    >>> from partitioner import load_profile
    >>> print(profile_summary(load_profile("h200/gpt2-medium")).splitlines()[0])
    gpt2-medium on NVIDIA H200 (bfloat16), micro-batch size 16:
"""

from __future__ import annotations

from partitioner.formats.profile import Profile
from partitioner.formats.units import format_bytes
from partitioner.report.tables import format_table

__all__ = ["profile_summary"]


def profile_summary(prof: Profile) -> str:
    """One row per layer at the largest micro-batch size: times, parameters and bytes."""
    j = len(prof.microbatch_sizes) - 1
    rows = [[lay.name, lay.type, f"{lay.fwd_ms[j]:.3f}", f"{lay.bwd_ms[j]:.3f}",
             format_bytes(lay.param_bytes), format_bytes(lay.out_bytes[j]),
             format_bytes(lay.saved_bytes[j])] for lay in prof.layers]
    harness = prof.extra.get("harness", {})
    timing = harness.get("timing") if isinstance(harness, dict) else None
    where = {"model": ", layers timed inside the whole model",
             "layer": ", layers timed alone"}.get(str(timing), "")
    head = (f"{prof.model} on {prof.device.name} ({prof.dtype}){where}, "
            f"micro-batch size {prof.microbatch_sizes[j]}:")
    return head + "\n" + format_table(
        ["layer", "type", "fwd_ms", "bwd_ms", "params", "out", "saved"], rows)
