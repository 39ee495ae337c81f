import math

import pytest

from partitioner.formats.units import format_bytes, parse_bandwidth_gbps, parse_bytes


@pytest.mark.parametrize("text,expected", [
    ("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("1.5MiB", 1572864), ("4096", 4096),
    ("2 kb", 2000), ("1e3", 1000),
])
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-1GiB", "0"])
def test_parse_bytes_rejects_with_the_value(text: str) -> None:
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


def test_bandwidth() -> None:
    assert parse_bandwidth_gbps("25") == 25.0
    assert math.isinf(parse_bandwidth_gbps("inf"))
    for bad in ("0", "-3", "fast", "nan"):
        with pytest.raises(ValueError, match="GB/s"):
            parse_bandwidth_gbps(bad)


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    assert format_bytes(2**62) == "unlimited"
