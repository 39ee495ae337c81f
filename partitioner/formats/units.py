"""Parsing and printing of byte sizes and bandwidths, the units the command line speaks.

    >>> parse_bytes("80GiB")
    85899345920
    >>> format_bytes(85899345920)
    '80.00 GiB'
"""

from __future__ import annotations

import math
import re

__all__ = ["MAX_BYTES", "MAX_MS", "MIN_BANDWIDTH_GBPS", "NO_LIMIT_BYTES", "format_bytes",
           "parse_bandwidth_gbps", "parse_bytes"]

#: The largest time a profile, plan or option may give (about 11.6 days): beyond it a figure is
#: a mistake, and sums of such figures would overflow to inf.
MAX_MS = 1e9
#: The largest byte count a profile or plan may give (4 EiB).
MAX_BYTES = float(2**62)
#: The slowest link accepted, 1 kB/s: anything slower is a typo, and its times overflow.
MIN_BANDWIDTH_GBPS = 1e-6
#: What ``parse_bytes("inf")`` returns: no memory limit.
NO_LIMIT_BYTES = 2**62

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str) -> int:
    """A size such as ``80GiB``, ``1.5GB``, ``4096`` or ``inf`` (no limit) in bytes.

        >>> parse_bytes("1KiB"), parse_bytes("2kb")
        (1024, 2000)
    """
    if text.strip().lower() in ("inf", "none", "unlimited"):
        return NO_LIMIT_BYTES
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _BYTE_UNITS:
        raise ValueError(
            f"memory size {text!r} is not a size: write a number with an optional unit "
            f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '80GiB', or 'inf' for no limit"
        )
    value = float(m.group(1)) * _BYTE_UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"memory size {text!r} is below one byte; give a positive size such "
                         f"as '80GiB', or 'inf' for no limit")
    if value > NO_LIMIT_BYTES:
        raise ValueError(f"memory size {text!r} is over 4 EiB; give a real device's memory, "
                         f"e.g. '80GiB', or 'inf' for no limit")
    return int(value)


def parse_bandwidth_gbps(text: str) -> float:
    """A link bandwidth in GB/s (10**9 bytes per second); ``inf`` means free communication.

        >>> parse_bandwidth_gbps("450"), parse_bandwidth_gbps("inf")
        (450.0, inf)
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= MIN_BANDWIDTH_GBPS:  # NaN fails too
        raise ValueError(
            f"bandwidth {text!r} must be a number of GB/s >= {MIN_BANDWIDTH_GBPS:g} (e.g. 450 "
            f"for NVLink, 25 for PCIe 4 x16) or 'inf' for free communication"
        )
    return value


def format_bytes(n_bytes: float) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    if n_bytes >= 2**61:
        return "unlimited"
    if not math.isfinite(n_bytes):
        return str(n_bytes)
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024.0:
            return f"{size:.0f} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024.0
    return f"{size:.2f} TiB"
