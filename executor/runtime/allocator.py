"""Keep the CPU allocator's freed memory for reuse, as a training loop wants it.

    >>> keep_freed_memory()   # on glibc; process-wide, idempotent  # doctest: +SKIP
    True

A training step allocates its activations, frees them all in the backward, and allocates
them again in the next step. With glibc's default settings, ``malloc`` serves large blocks
with ``mmap`` and hands freed memory at the top of the heap back to the OS, so the next step
page-faults the same memory in again (zeroing every page): a few percent of a CPU step, more
for small models, and paid differently by a layer timed alone (which reuses its own freed
blocks) than by the whole model. CUDA's caching allocator keeps freed blocks; this makes the
CPU heap do the same: blocks come from the heap (no ``mmap`` below 2 GiB, or 32 MiB on old
glibc) and the heap is never trimmed, so memory stays at the step's peak and is reused.

It changes the whole process and is not undone, so nothing calls it behind the caller's
back: ``Pipeline``, ``DistributedRunner`` and ``profile_model`` take ``keep_freed_memory=True``
(default False) to call it, and the command line (``partition-model profile``, ``run``,
``calibrate``) and the demo turn it on by default (``--keep-freed-memory off`` to leave the
allocator alone), so layers are profiled under the allocator the pipeline runs with. Other
allocators (jemalloc, tcmalloc through LD_PRELOAD) already behave this way and are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1
_OLD_GLIBC_MMAP_MAX = 32 << 20  # HEAP_MAX_SIZE / 2 on 64-bit glibc before 2.35


@functools.cache
def keep_freed_memory() -> bool:
    """Configure glibc malloc to keep freed memory (see the module text). True when the
    settings took effect; False where the C library is not glibc (nothing is changed)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    mapped = (mallopt(_M_MMAP_THRESHOLD, _INT_MAX) == 1
              or mallopt(_M_MMAP_THRESHOLD, _OLD_GLIBC_MMAP_MAX) == 1)
    return bool(trimmed and mapped)
