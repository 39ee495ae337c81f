"""The simulator with D replicas: one replica's pipeline, then each stage's gradient all-reduce."""

from __future__ import annotations

import pytest

from partitioner.cost.allreduce import ring_allreduce_ms
from partitioner.cost.model import CostModel
from partitioner.formats.assumptions import Link
from partitioner.formats.profile import load_profile
from partitioner.simulator.engine import simulate
from tests.synthetic import make_profile

LINK = Link(10.0, 0.001)  # 10 GB/s: 1e8 bytes over 2 replicas take 10 ms + 2 us


@pytest.mark.parametrize("mode", ["overlapped", "after"])
@pytest.mark.parametrize(("big_k", "m", "d"), [(2, 4, 2), (4, 8, 4), (3, 1, 8)])
def test_equal_stages_closed_form(mode: str, big_k: int, m: int, d: int) -> None:
    prof = make_profile([1.0] * big_k, param_bytes=[10**8] * big_k)
    cm = CostModel(prof, d * m, m, stages=big_k, replicas=d, allreduce_link=LINK,
                   allreduce=mode)  # type: ignore[arg-type]
    res = simulate(cm, [(k, k + 1) for k in range(big_k)], record=False)
    a = ring_allreduce_ms(1e8, d, LINK)
    # GPipe (M+K-1)(f+b), f = 1, b = 2; stage 0 finishes last, so its all-reduce ends the step
    assert res.step_ms == pytest.approx((m + big_k - 1) * 3.0 + a)
    assert res.allreduce == mode and res.allreduce_ms == pytest.approx((a,) * big_k)


def test_overlapped_hides_the_late_stages_allreduce() -> None:
    # stage 1 holds 4x the parameters: its all-reduce starts at its last B, b = 2 ms before
    # stage 0's last B ends (the closed form max over k of (T - k b + a_k))
    prof = make_profile([1.0, 1.0], param_bytes=[10**8, 4 * 10**8])
    m, d = 4, 2
    big_t = (m + 1) * 3.0
    a0, a1 = ring_allreduce_ms(1e8, d, LINK), ring_allreduce_ms(4e8, d, LINK)
    steps = {}
    for mode in ("overlapped", "after"):
        cm = CostModel(prof, d * m, m, stages=2, replicas=d, allreduce_link=LINK,
                       allreduce=mode)  # type: ignore[arg-type]
        steps[mode] = simulate(cm, [(0, 1), (1, 2)], record=False).step_ms
    assert steps["overlapped"] == pytest.approx(max(big_t + a0, big_t - 2.0 + a1))
    assert steps["after"] == pytest.approx(big_t + max(a0, a1))
    assert steps["overlapped"] < steps["after"]


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1", "interleaved", "zbv"])
def test_overlapped_never_slower_than_after(schedule: str) -> None:
    prof = load_profile("h200/gpt2-medium")
    ranges = [(0, 7), (7, 14), (14, 20), (20, 26)]
    steps = []
    for mode in ("overlapped", "after"):
        cm = CostModel(prof, 32, 8, stages=4, schedule=schedule,  # type: ignore[arg-type]
                       replicas=2, allreduce_link=LINK, allreduce=mode,  # type: ignore[arg-type]
                       stages_per_rank=2 if schedule in ("interleaved", "zbv") else 1)
        steps.append(simulate(cm, ranges, record=False).step_ms)
    assert steps[0] <= steps[1] + 1e-9


def test_one_replica_has_no_allreduce_and_d_replicas_run_one_share() -> None:
    prof = load_profile("h200/gpt2-medium")
    ranges = [(0, 13), (13, 26)]
    one = simulate(CostModel(prof, 16, 4, stages=2, allreduce_link=LINK), ranges)
    assert (one.allreduce, one.allreduce_ms) == ("", ())
    four = simulate(CostModel(prof, 64, 4, stages=2, replicas=4, allreduce_link=Link(
        float("inf"), 0.0)), ranges)  # a free all-reduce: exactly one replica's B/D = 16
    assert four.step_ms == one.step_ms
    assert four.stage_peak_bytes == one.stage_peak_bytes
    assert four.stage_busy_ms == one.stage_busy_ms
