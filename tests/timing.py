"""Timing checks on a shared machine: measure again when a measurement misses.

A test of measured times asserts a property a quiet machine meets; on a loaded one (CI's two
cores shared with other jobs) a lost time slice can add milliseconds to one sleep, once. Such
a test measures up to ``tries`` times and fails only when every measurement misses, with the
last one's misses; a systematic error misses every time and still fails.

>>> calls = []
>>> settle(lambda: calls.append(1) or len(calls), lambda n: [] if n == 2 else [f"try {n}"])
[]
>>> settle(lambda: 0, lambda n: ["always off"], tries=2)
['always off']
"""

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def settle(measure: Callable[[], T], misses: Callable[[T], list[str]],
           tries: int = 3) -> list[str]:
    """Measure until ``misses`` of the measurement is empty, ``tries`` times at most; return
    the last measurement's misses (empty when one fitted)."""
    found: list[str] = []
    for _ in range(tries):
        found = misses(measure())
        if not found:
            break
    return found
