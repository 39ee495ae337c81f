"""Which micro-batch counts M a search tries for a batch of B samples.

    >>> microbatch_candidates(10), power_of_two_microbatches(12)
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 6, 12])
"""

from __future__ import annotations

from partitioner.schedule.generators import MAX_MICROBATCHES

__all__ = ["microbatch_candidates", "power_of_two_microbatches"]


def microbatch_candidates(global_batch: int, all_up_to: int = 64, most: int = 1024
                          ) -> list[int]:
    """M to try for a batch of B: every M up to ``all_up_to``, and beyond it, up to ``most``
    micro-batches, for each largest micro-batch size b the fewest micro-batches that reach
    it, M = ceil(B/b) (divisors and non-divisors alike; more micro-batches of the same largest
    size only add per-micro-batch overhead).

        >>> microbatch_candidates(10), microbatch_candidates(16, all_up_to=4)
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 6, 8, 16])
        >>> len(microbatch_candidates(10**12)) <= 1024
        True
    """
    if global_batch < 1:
        raise ValueError(f"global batch B={global_batch} must be at least 1")
    top = min(global_batch, most)

    def size(m: int) -> int:
        return -(-global_batch // m)
    # M is the fewest for its b exactly when one micro-batch fewer makes them larger
    return [m for m in range(1, top + 1) if m <= all_up_to or size(m - 1) > size(m)]


def power_of_two_microbatches(global_batch: int) -> list[int]:
    """Fewer M to try (the default for the slower graph partitioner): the fewest
    micro-batches for each largest size b = B and b = 1, 2, 4, ... < B.

        >>> power_of_two_microbatches(8), power_of_two_microbatches(12)
        ([1, 2, 4, 8], [1, 2, 3, 6, 12])
    """
    if global_batch < 1:
        raise ValueError(f"global batch B={global_batch} must be at least 1")
    sizes = {global_batch} | {2**j for j in range(global_batch.bit_length()) if 2**j < global_batch}
    return sorted(m for m in {-(-global_batch // b) for b in sizes} if m <= MAX_MICROBATCHES)
