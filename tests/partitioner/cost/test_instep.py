"""A layer's time in a step from its time alone (cost.instep) and the cost model's use of it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from partitioner.cost.instep import LAUNCH_BAND, device_ms, instep_ms, pooled
from partitioner.cost.model import CostModel
from partitioner.formats.assumptions import Runtime
from partitioner.formats.device import DeviceModel, load_device_model
from partitioner.formats.profile import load_profile

SIZES = (1, 2, 4, 8)


def test_launch_bound_sizes_cost_the_host_and_device_bound_ones_the_device() -> None:
    dm = DeviceModel("t", host_forward=0.6, device_scale=1.1, small_work_exponent=0.8)
    alone = np.array([[2.0, 2.0, 2.1, 6.0],     # device-bound at b=8 only
                      [1.0, 2.0, 4.0, 8.0],     # device-bound at every size but the floor
                      [0.5, 0.5, 0.5, 0.5]])    # launch-bound everywhere
    for b in (1, 2, 3, 8, 16):
        got = instep_ms(alone, SIZES, dm.host_forward, dm, b)
        dev0 = 6.0 * (b / 8) ** (0.8 if b < 8 else 1.0) * 1.1
        dev1 = (2.0 * (b / 2) ** 0.8 if b < 2 else np.interp(b, SIZES, alone[1]) if b <= 8
                else 8.0 + (b - 8) * (8.0 - 4.0) / 4) * 1.1  # linear on from the last two
        dev2 = 0.5 * (b / 8) ** (0.8 if b < 8 else 1.0) * 1.1
        assert got.tolist() == pytest.approx([max(0.6 * 2.0, dev0), max(0.6 * 1.0, dev1),
                                              max(0.6 * 0.5, dev2)])


def test_a_layer_that_took_no_time_takes_none_and_launch_ms_is_the_host_floor() -> None:
    dm = DeviceModel("t", host_backward=2.0)
    alone = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert instep_ms(alone, SIZES, 2.0, dm, 2).tolist() == [0.0, 2.0]
    launch = np.array([0.0, 0.25])
    # host 2 x 0.25; device: launch-bound at every size, so b/8 of its b=8 time, 0.25
    assert instep_ms(alone, SIZES, 2.0, dm, 2, launch).tolist() == [0.0, 0.5]


def test_the_band_decides_which_sizes_are_device_bound() -> None:
    dm = DeviceModel("t")
    just_in = np.array([[1.0, LAUNCH_BAND * 1.0, 4.0]])  # at the band: still launch-bound
    assert device_ms(just_in, (1, 2, 4), dm, 2).tolist() == pytest.approx([2.0])
    just_out = np.array([[1.0, LAUNCH_BAND * 1.01, 4.0]])
    assert device_ms(just_out, (1, 2, 4), dm, 2).tolist() == pytest.approx([LAUNCH_BAND * 1.01])


def test_pooling_takes_the_median_of_a_signature() -> None:
    table = np.array([[1.0, 9.0], [2.0, 2.0], [3.0, 1.0], [7.0, 7.0]])
    assert pooled(table, [0, 0, 0, 1]).tolist() == [[2.0, 2.0]] * 3 + [[7.0, 7.0]]


def test_without_a_device_model_the_cost_model_is_the_profile() -> None:
    prof = load_profile("h200/gpt-1.3b")
    cm = CostModel(prof, 16, 4, stages=2, recompute="always")
    for key in ("fwd_ms", "bwd_ms"):
        want = np.array([getattr(lay, key)[2] for lay in prof.layers])  # b = 4 is measured
        assert cm.layer_array(key).tolist() == pytest.approx(want.tolist())
    assert cm.layer_array("recompute_ms") is cm.layer_array("fwd_ms")


def test_the_device_model_prices_recompute_with_its_own_host_factor() -> None:
    prof = load_profile("h200/gpt-1.3b")
    dm = load_device_model("h200")
    cm = CostModel(prof, 16, 16, stages=2, recompute="always", runtime=Runtime(device=dm))
    fwd, again = cm.layer_array("fwd_ms"), cm.layer_array("recompute_ms")
    blocks = [i for i, lay in enumerate(prof.layers) if lay.type == "Block"]
    # the host issues a block in its host factor x the pooled floor; alone it costs the larger
    floor = np.median([prof.layers[i].fwd_ms for i in blocks], axis=0).min()
    host, rc_host = cm.layer_array("host:fwd_ms"), cm.layer_array("host:recompute_ms")
    assert host[blocks].tolist() == pytest.approx([dm.host_forward * floor] * len(blocks))
    assert rc_host[blocks].tolist() == pytest.approx([dm.host_recompute * floor] * len(blocks))
    for key, side in (("fwd_ms", host), ("recompute_ms", rc_host)):
        assert cm.layer_array(key).tolist() == pytest.approx(
            np.maximum(side, cm.layer_array(f"device:{key}")).tolist())
    assert cm.layer_array("device:recompute_ms").tolist() == cm.layer_array(
        "device:fwd_ms").tolist()  # the same kernels, issued through other hooks
    bwd = cm.backward_ms()
    assert cm.stage_compute_ms(0, 13, 0) == pytest.approx(float((fwd + bwd + again)[:13].sum()))
    scaled = CostModel(prof, 16, 16, stages=2, recompute="always",
                       runtime=Runtime(compute_scale=2.0, device=dm))
    assert scaled.layer_array("recompute_ms").tolist() == pytest.approx((2 * again).tolist())


def test_identical_layers_cost_the_same_in_a_step() -> None:
    prof = load_profile("h200/gpt2-medium")
    cm = CostModel(prof, 16, 4, runtime=Runtime(device=load_device_model("h200")))
    blocks = [i for i, lay in enumerate(prof.layers) if lay.type == "Block"]
    assert len(set(cm.layer_array("bwd_ms")[blocks].tolist())) == 1
    noisy = dataclasses.replace(prof.layers[blocks[0]], fwd_ms=tuple(
        10 * x for x in prof.layers[blocks[0]].fwd_ms))
    layers = list(prof.layers)
    layers[blocks[0]] = noisy
    one_off = CostModel(dataclasses.replace(prof, layers=tuple(layers)), 16, 4,
                        runtime=Runtime(device=load_device_model("h200")))
    assert one_off.layer_array("fwd_ms")[blocks[0]] == pytest.approx(
        cm.layer_array("fwd_ms")[blocks[0]], rel=0.01)  # the median of 24 moves by one rank
