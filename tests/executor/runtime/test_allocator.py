"""The CPU allocator keeps freed memory: a step's large activations do not page-fault again."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from executor.runtime.allocator import keep_freed_memory
    assert keep_freed_memory()
def step():
    t = torch.empty(64 << 18)  # 64 MiB: above glibc's largest automatic mmap threshold
    t.fill_(1.0)               # touch every page
    del t
step()  # the first allocations fault their pages in, kept or not
step()
step()
windows = []  # the fewest faults of three windows of 5 steps: the kernel's NUMA balancing
for _ in range(3):  # may unmap pages now and then (its hinting faults count as minor faults)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    windows.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(windows))
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_is_reused_without_page_faults() -> None:
    pages = 5 * (64 << 20) // 4096
    default, kept = _faults("default"), _faults("keep")
    assert default > pages // 2, f"glibc's default mmaps 64 MiB blocks: expected faults, got {default}"
    assert kept < pages // 50, f"with freed memory kept, 5 steps faulted {kept} pages"
