import math

import pytest

from executor.calibrate import fit_link, measure_link


def test_fit_link_recovers_latency_and_bandwidth() -> None:
    sizes = [1e3, 1e5, 1e6, 1e7]
    link = fit_link(sizes, [0.2 + n / (2.5 * 1e6) for n in sizes])
    assert link.bandwidth_gbps == pytest.approx(2.5, rel=1e-6)
    assert link.latency_ms == pytest.approx(0.2, abs=1e-6)
    # a negative intercept (noise) is refitted through the origin, never a negative latency
    assert fit_link([1e6, 2e6], [0.9, 2.0]).latency_ms == 0.0
    with pytest.raises(ValueError, match="two"):
        fit_link([1e6], [1.0])


@pytest.mark.timeout(120)
def test_measure_link_between_two_local_ranks() -> None:
    link = measure_link(sizes_bytes=(4096, 1 << 20), repeats=3)
    assert math.isfinite(link.bandwidth_gbps) and link.bandwidth_gbps > 0
    assert 0 <= link.latency_ms < 100
    with pytest.raises(ValueError, match="distinct"):
        measure_link(sizes_bytes=(4096, 4096))


def test_fit_link_takes_the_latency_from_the_small_messages() -> None:
    # an exact line but for one slow large transfer: a plain least-squares fit would move the
    # intercept by ~0.3 ms; on relative errors the latency stays near the small messages'
    sizes = [4e3, 6.4e4, 1e6, 4e6, 1.6e7]
    times = [0.1 + n / 4e6 for n in sizes]
    times[2] += 1.0
    link = fit_link(sizes, times)
    assert link.latency_ms == pytest.approx(0.1, abs=0.03)
    assert link.bandwidth_gbps == pytest.approx(4.0, rel=0.1)
