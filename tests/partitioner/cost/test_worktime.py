"""A pass's time alone from its kernels' work (cost.worktime): closed forms and the fit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from partitioner.cost.worktime import PassWork, alone_ms, fit_work_figures
from partitioner.formats.device import DeviceModel

DM = DeviceModel("toy", peak_tflops=(("bfloat16", 100.0),), memory_gbps=1000.0,
                 half_work_gflop=2.0, memory_efficiency=0.5, conv_efficiency=0.25,
                 layer_launch_ms=0.01, kernel_launch_ms=0.002, backward_kernel_launch_ms=0.001,
                 view_launch_ms=0.0005)


def test_each_kernel_is_a_roofline_and_the_pass_their_sum_or_its_launches() -> None:
    ops = [[(10**12, 10**6, 0)],            # compute-bound product: (1e12 + 2e9) / 1e11
           [(0, 10**9, 0)],                 # memory-bound: 1e9 / (1e9 x 0.5) ms
           [(10**12, 10**6, 1)],            # a convolution at a quarter of the peak
           [(0, 10**3, 0)] * 3,             # tiny kernels: the launches win
           [(0, 10**3, 0)] * 3]
    work = PassWork.of(ops, [1, 1, 1, 3, 3], [False, False, False, False, True], [0, 0, 0, 4, 4])
    got = alone_ms(work, DM, "bfloat16").tolist()
    assert got == pytest.approx([10.02, 2.0, 40.08, 0.01 + 3 * 0.002 + 4 * 0.0005,
                                 0.01 + 3 * 0.001 + 4 * 0.0005])


def test_a_pass_without_kernels_takes_no_time() -> None:
    work = PassWork.of([[]], [0])
    assert alone_ms(work, DM, "bfloat16").tolist() == [0.0]


def test_the_fit_recovers_figures_that_made_the_times() -> None:
    rng = np.random.default_rng(0)
    ops, kernels, backward, views = [], [], [], []
    for _ in range(300):
        n = int(rng.integers(1, 12))
        ops.append([(int(10 ** rng.uniform(6, 12.5)), int(10 ** rng.uniform(4, 9.5)),
                     int(rng.random() < 0.3)) for _ in range(n)])
        kernels.append(n)
        backward.append(bool(rng.random() < 0.5))
        views.append(int(rng.integers(0, 20)))
    work = PassWork.of(ops, kernels, backward, views)
    measured = alone_ms(work, DM, "bfloat16")
    start = dataclasses.replace(DM, half_work_gflop=0.0, memory_efficiency=1.0,
                                conv_efficiency=1.0, layer_launch_ms=0.0, kernel_launch_ms=0.0,
                                backward_kernel_launch_ms=0.0, view_launch_ms=0.0)
    fitted = fit_work_figures(work, measured, start, "bfloat16", evals=1500)
    pred = alone_ms(work, fitted, "bfloat16")
    assert np.median(np.abs(pred - measured) / measured) < 0.02


def test_too_few_timed_passes_are_refused() -> None:
    work = PassWork.of([[(1, 1, 0)]], [1])
    with pytest.raises(ValueError, match="1 timed passes cannot fit 7 figures"):
        fit_work_figures(work, np.array([1.0]), DM, "bfloat16")
