"""The simulator's two clocks under a device model: the host issues, the device runs, and the
host waits only for what comes from another device."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from partitioner.cost.instep import span_ms
from partitioner.cost.model import CostModel
from partitioner.formats.assumptions import LINKS, Runtime
from partitioner.formats.device import load_device_model
from partitioner.formats.profile import load_profile
from partitioner.simulator.durations import stage_durations, stage_of_ranges
from partitioner.simulator.engine import simulate


def _stream(host: list[float], device: list[float], h: float = 0.0,
            t: float = 0.0) -> tuple[float, float]:
    """Layer by layer: the host issues each layer's kernels over its host time, the device runs
    them over its device time, a kernel once issued and once the device is free (a fluid)."""
    for hh, dd in zip(host, device, strict=True):
        t = max(h + hh, max(t, h) + dd)
        h += hh
    return h, t


def test_span_is_the_stream_of_its_layers() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 8))
        host, device = rng.exponential(1.0, n), rng.exponential(1.0, n)
        h0, t0 = float(rng.uniform(0, 3)), float(rng.uniform(0, 3))
        h, t = _stream(host.tolist(), device.tolist(), h0, t0)
        span = float(span_ms(host, device)[0])
        assert t == pytest.approx(max(t0 + device.sum(), h0 + span))  # max-plus linear
        assert h == pytest.approx(h0 + host.sum())
        assert max(host.sum(), device.sum()) - 1e-9 <= span <= np.maximum(host, device).sum() + 1e-9


def _cm(microbatches: int, recompute: str, stages: int, batch: int = 16,
        **figures: float) -> CostModel:
    return CostModel(load_profile("h200/gpt-1.3b"), batch, microbatches, stages=stages,
                     recompute=recompute, link=LINKS["free"], optimizer="none",  # type: ignore[arg-type]
                     runtime=Runtime(device=load_device_model("h200").with_figures(**figures)))


@pytest.mark.parametrize(("microbatches", "recompute"), [(1, "never"), (4, "always"),
                                                         (16, "always")])
def test_one_device_streams_every_action_in_the_order_it_ran(microbatches: int,
                                                             recompute: str) -> None:
    # four stages on one device: the step is the stream of every layer of every action, in
    # the order the device ran them; nothing makes the host wait until the end
    cm = _cm(microbatches, recompute, 4)
    ranges = [(0, 6), (6, 13), (13, 20), (20, 26)]
    res = simulate(cm, ranges, devices=[0] * 4)
    assert res.timeline is not None
    b = cm.microbatch_size
    host, device = {}, {}
    for key in ("fwd_ms", "bwd_ms", "recompute_ms"):
        host[key], device[key] = (cm.layer_array(f"host:{key}", b).tolist(),
                                  cm.layer_array(f"device:{key}", b).tolist())
    h = t = 0.0
    for e in sorted(res.timeline.events, key=lambda e: e.start_ms):
        start, end = ranges[e.action.stage]
        if e.action.kind == "F":
            layers = [("fwd_ms", j) for j in range(start, end)]
        else:
            layers = ([("recompute_ms", j) for j in range(start, end)]
                      if recompute == "always" else []) + [
                ("bwd_ms", j) for j in reversed(range(start, end))]
        h, t = _stream([host[k][j] for k, j in layers], [device[k][j] for k, j in layers], h, t)
        assert e.end_ms == pytest.approx(t)
    assert res.step_ms == pytest.approx(t)
    # the host runs ahead: at most the actions' spans one after another, less with many
    dur = stage_durations(cm, stage_of_ranges(ranges), [0] * 4)
    one_by_one = microbatches * (sum(f[0] for f in dur.fwd_ms) + sum(x[0] for x in dur.bwd_ms))
    assert res.step_ms <= one_by_one + 1e-9
    if microbatches == 16:
        assert res.step_ms < 0.95 * one_by_one


def test_the_host_waits_for_what_another_device_sends() -> None:
    cm = _cm(1, "never", 2, batch=1)  # b = 1: the backward is launch-bound
    ranges = [(0, 13), (13, 26)]
    dur = stage_durations(cm, stage_of_ranges(ranges), [0, 1])
    (f0, f1), (b0, b1) = ([x[0] for x in dur.fwd_ms], [x[0] for x in dur.bwd_ms])
    hf1, hb1 = dur.host_ms[0][1][0], dur.host_ms[1][1][0]
    db1 = dur.device_ms[1][1][0]
    # F0 from 0; stage 1 receives at its end, host and device; its B streams behind its F; stage
    # 0's host waited for the gradient, so B0 is its span from the arrival
    arrive = f0
    end_f1 = arrive + f1
    end_b1 = max(end_f1 + db1, arrive + hf1 + b1)
    assert hb1 > 0
    res = simulate(cm, ranges, devices=[0, 1])
    assert res.step_ms == pytest.approx(end_b1 + b0)
    # on one device nothing waits: the second stage's host issues F1 while F0 runs
    one = simulate(cm, ranges, devices=[0, 0])
    assert one.step_ms < res.step_ms


def test_without_a_device_model_one_clock() -> None:
    prof = load_profile("h200/gpt-1.3b")
    for m, rc in itertools.product((1, 4), ("never", "always")):
        cm = CostModel(prof, 16, m, stages=2, recompute=rc)  # type: ignore[arg-type]
        dur = stage_durations(cm, stage_of_ranges([(0, 13), (13, 26)]), [0, 1])
        assert dur.host_ms == dur.device_ms == ()
        assert sum(f[0] for f in dur.fwd_ms) == pytest.approx(float(cm.layer_array(
            "fwd_ms").sum()))  # an action's time is its layers' sum
