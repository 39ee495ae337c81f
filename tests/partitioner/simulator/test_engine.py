"""The simulator against closed forms: GPipe's step and bubble, memory per schedule, the DP's
per-stage time, hand-computed communication, shared devices and uneven micro-batches."""

import itertools
import math
import random
from dataclasses import replace

import pytest

from partitioner.cost.model import CostModel
from partitioner.cost.partition import stage_costs
from partitioner.formats.assumptions import LINKS, Link, Runtime
from partitioner.formats.profile import load_profile
from partitioner.formats.timeline import Event
from partitioner.schedule.generators import gpipe, make_schedule
from partitioner.schedule.ir import ScheduleError, lower
from partitioner.simulator.engine import SimResult, ranges_from_boundaries, simulate
from partitioner.solve.chain import partition_chain
from tests.synthetic import make_profile, schedule_from_rows, with_saved_parts


def _balanced(big_k: int, m: int, fwd_ms: float, bwd_ms: float, schedule: str = "gpipe",
              layers_per_stage: int = 1, **kw: object) -> tuple[CostModel, list[tuple[int, int]]]:
    n = big_k * layers_per_stage
    prof = make_profile([fwd_ms / layers_per_stage] * n, [bwd_ms / layers_per_stage] * n,
                        **kw)  # type: ignore[arg-type]
    cm = CostModel(prof, m, m, stages=big_k, schedule=schedule)  # type: ignore[arg-type]
    return cm, [(k * layers_per_stage, (k + 1) * layers_per_stage) for k in range(big_k)]


def _check_events(res: SimResult, devices: list[int] | None = None) -> None:
    """Events on one device never overlap; F(k,i) after F(k-1,i), B(k,i) after B(k+1,i)."""
    tl = res.timeline
    assert tl is not None and tl.kind == "predicted"
    devices = devices or list(range(tl.stages))
    by_device: dict[int, list[Event]] = {}
    end = {}
    for e in tl.events:
        by_device.setdefault(devices[e.action.stage], []).append(e)
        end[(e.action.kind, e.action.stage, e.action.microbatch)] = e.end_ms
    for evs in by_device.values():
        evs.sort(key=lambda e: e.start_ms)
        for a, b in itertools.pairwise(evs):
            assert a.end_ms <= b.start_ms + 1e-9, (a, b)
    for e in tl.events:
        kind, k, i = e.action.kind, e.action.stage, e.action.microbatch
        if kind == "F" and k > 0:
            assert e.start_ms >= end[("F", k - 1, i)] - 1e-9
        if kind == "B" and k < tl.stages - 1:
            assert e.start_ms >= end[("B", k + 1, i)] - 1e-9
        if kind == "B":
            assert e.start_ms >= end[("F", k, i)] - 1e-9


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("big_k,m,fwd_ms,bwd_ms,per_stage", [
    (1, 1, 1.0, 2.0, 1), (2, 1, 1.0, 2.0, 1), (4, 8, 1.0, 2.0, 1), (3, 5, 0.7, 2.1, 2),
    (5, 2, 2.0, 1.0, 3), (8, 3, 1.5, 1.5, 1), (6, 17, 0.25, 0.5, 1)])
def test_balanced_closed_forms(schedule: str, big_k: int, m: int, fwd_ms: float,
                               bwd_ms: float, per_stage: int) -> None:
    cm, ranges = _balanced(big_k, m, fwd_ms, bwd_ms, schedule, per_stage)
    res = simulate(cm, ranges)
    assert res.step_ms == pytest.approx((m + big_k - 1) * (fwd_ms + bwd_ms))
    assert res.bubble_fraction == pytest.approx((big_k - 1) / (m + big_k - 1))
    assert res.stage_busy_ms == pytest.approx([m * (fwd_ms + bwd_ms)] * big_k)
    assert res.stage_comm_ms == (0.0,) * big_k
    assert res.timeline is not None
    assert res.timeline.step_ms == pytest.approx(res.step_ms)
    assert res.timeline.bubble_fraction == pytest.approx(res.bubble_fraction)
    assert res.timeline.stage_busy_ms() == pytest.approx(list(res.stage_busy_ms))
    _check_events(res)


@pytest.mark.parametrize("big_k,m", [(4, 8), (4, 2), (5, 5), (1, 3)])
def test_activations_held_per_schedule(big_k: int, m: int) -> None:
    """GPipe holds M micro-batches' saved activations on every stage; 1F1B min(K-k, M)."""
    saved = 1000.0
    for schedule in ("gpipe", "1f1b"):
        cm, ranges = _balanced(big_k, m, 1.0, 2.0, schedule, saved_bytes=[saved] * big_k)
        peaks = simulate(cm, ranges).stage_peak_bytes
        held = [m if schedule == "gpipe" else min(big_k - k, m) for k in range(big_k)]
        assert list(peaks) == [h * saved for h in held]


@pytest.mark.parametrize("schedule,recompute,exact", list(itertools.product(
    ["gpipe", "1f1b", "zb-h1"], ["never", "always", "except_last"], [False, True])))
def test_peak_memory_equals_the_dp_closed_form(schedule: str, recompute: str,
                                               exact: bool) -> None:
    """Weights + grads + optimizer state + held activations (or stashed inputs plus one
    micro-batch's saved during recompute): CostModel.stage_memory_bytes, on even splits; with
    ``exact``, the terms of a profile that says what its layers share, and the batch."""
    base = load_profile("h200/gpt2-medium")
    profiles = [with_saved_parts(base, random.Random(seed)) for seed in range(4)] if exact \
        else [base]  # the seeds: with and without what W keeps (held_for_w_bytes)
    assert not exact or {p.layers[0].held_for_w_bytes is None for p in profiles} == {True, False}
    for prof, (big_k, m) in itertools.product(profiles, [(4, 4), (3, 8), (2, 16)]):
        cm = CostModel(prof, 16, m, stages=big_k, schedule=schedule,  # type: ignore[arg-type]
                       recompute=recompute, link=LINKS["nvlink"])  # type: ignore[arg-type]
        sol = partition_chain(cm)
        res = simulate(cm, ranges_from_boundaries(sol.boundaries))
        assert res.stage_peak_bytes == pytest.approx(sol.stage_memory_bytes, rel=1e-12)
        # and the DP's per-stage time: compute + comm_in + comm_out per micro-batch
        occupied = [b + c for b, c in zip(res.stage_busy_ms, res.stage_comm_ms, strict=True)]
        assert occupied == pytest.approx([m * ms for ms in sol.stage_ms], rel=1e-12)
        assert res.step_ms >= m * sol.bottleneck_ms
        _check_events(res)


def test_recompute_costs_a_second_forward_inside_b() -> None:
    prof = make_profile([1.0, 1.0], [2.0, 2.0], saved_bytes=[50.0, 50.0], in_bytes=[7.0, 7.0])
    cm = CostModel(prof, 2, 2, stages=2, recompute="except_last")
    res = simulate(cm, [(0, 1), (1, 2)])
    assert res.timeline is not None
    durations = {str(e.action): e.duration_ms for e in res.timeline.events}
    assert durations["0B0"] == 3.0 and durations["1B0"] == 2.0
    assert res.stage_peak_bytes == (2 * 7.0 + 50.0, 2 * 50.0)


def test_communication_occupies_the_sender_and_delays_the_receiver() -> None:
    """K=2, M=1: F0, send (c), F1, B1, send back (c), B0: 2f + 2b + 2c."""
    link = Link(bandwidth_gbps=1.0, latency_ms=0.5)  # 1e6 bytes take 1 ms on the wire
    prof = make_profile([1.0, 1.0], [2.0, 2.0], out_bytes=[2e6, 9.0])
    cm = CostModel(prof, 1, 1, stages=2, link=link)
    res = simulate(cm, [(0, 1), (1, 2)])
    c = 0.5 + 2.0
    assert res.step_ms == pytest.approx(2 * 1.0 + 2 * 2.0 + 2 * c)
    assert res.stage_comm_ms == pytest.approx((c, c))
    assert res.timeline is not None
    spans = {str(e.action): (e.start_ms, e.end_ms) for e in res.timeline.events}
    assert spans["0SF0"] == pytest.approx((1.0, 1.0 + c))
    assert spans["1F0"] == pytest.approx((1.0 + c, 2.0 + c))
    assert spans["1SB0"] == pytest.approx((4.0 + c, 4.0 + 2 * c))
    assert spans["0B0"] == pytest.approx((4.0 + 2 * c, 6.0 + 2 * c))
    # the same stages on one device exchange tensors for free
    assert simulate(cm, [(0, 1), (1, 2)], devices=[0, 0]).step_ms == pytest.approx(6.0)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_plain_and_lowered_schedules_agree(schedule: str) -> None:
    prof = load_profile("h200/gpt2-medium")
    cm = CostModel(prof, 16, 5, stages=4, schedule=schedule,  # type: ignore[arg-type]
                   recompute="except_last", link=LINKS["ethernet"])
    ranges = ranges_from_boundaries(partition_chain(cm).boundaries)
    for devices in (None, [0, 0, 1, 1]):
        plain = simulate(cm, ranges, devices=devices)
        lowered = simulate(cm, ranges, lower(make_schedule(schedule, 4, 5)), devices=devices)
        assert plain == lowered


def test_one_device_runs_everything_back_to_back() -> None:
    cm, ranges = _balanced(4, 6, 1.0, 2.0, out_bytes=[1e7] * 4)
    cm = CostModel(cm.profile, 6, 6, stages=4, link=LINKS["pcie"])
    res = simulate(cm, ranges, devices=[0] * 4)
    assert res.step_ms == pytest.approx(4 * 6 * 3.0)  # no idle time, no communication
    assert res.bubble_fraction == pytest.approx(0.0, abs=1e-12)
    _check_events(res, [0] * 4)
    two = simulate(cm, ranges, devices=[0, 0, 1, 1])
    _check_events(two, [0, 0, 1, 1])
    assert simulate(cm, ranges).step_ms < two.step_ms < res.step_ms


def test_uneven_microbatches_take_their_own_sizes() -> None:
    """Time proportional to b (synthetic profile): K=1 takes B x (f+b) for any M."""
    prof = make_profile([1.0], [2.0])
    for m in (1, 3, 4, 7, 10):
        res = simulate(CostModel(prof, 10, m), [(0, 1)])
        assert res.step_ms == pytest.approx(10 * 3.0)
        assert res.timeline is not None
        sizes = [e.duration_ms / 1.0 for e in res.timeline.events if e.action.kind == "F"]
        assert sizes == pytest.approx(sorted(sizes, reverse=True))  # larger ones first
        assert sum(sizes) == pytest.approx(10.0)


def test_optimizer_step_ends_each_stage() -> None:
    cm, ranges = _balanced(4, 4, 1.0, 2.0, param_bytes=[100, 100, 100, 100])
    base = simulate(cm, ranges).step_ms
    res = simulate(cm, ranges, optimizer_ms=8.0)
    assert res.step_ms == pytest.approx(base + 2.0)  # stage 0 finishes last, its share is 1/4
    assert res.bubble_fraction == pytest.approx(1 - (4 * 4 * 3.0 + 8.0) / (4 * res.step_ms))
    one = simulate(cm, ranges, devices=[0] * 4, optimizer_ms=8.0)
    assert one.step_ms == pytest.approx(4 * 4 * 3.0 + 8.0)


def test_bad_inputs_are_refused_with_the_rule() -> None:
    cm, ranges = _balanced(2, 2, 1.0, 2.0)
    with pytest.raises(ValueError, match="3 stage ranges given but the cost model has K=2"):
        simulate(cm, [(0, 1), (1, 2), (2, 2)])
    with pytest.raises(ValueError, match="stages end at layer 1 but the model has 2"):
        simulate(cm, [(0, 1)] * 1 + [(1, 1)])
    with pytest.raises(ValueError, match="schedule 'gpipe' is for K=2, M=3"):
        simulate(cm, ranges, gpipe(2, 3))
    with pytest.raises(ValueError, match="optimizer_ms=-1"):
        simulate(cm, ranges, optimizer_ms=-1.0)
    with pytest.raises(ScheduleError, match="backward before the forward"):
        simulate(cm, ranges, schedule_from_rows("bad", [["0B0", "0F0", "0F1", "0B1"],
                                                ["1F0", "1B0", "1F1", "1B1"]]))
    deadlock = schedule_from_rows("stuck", [["0RB0", "0F0", "0SF0", "0F1", "0SF1", "0B0", "0B1",
                                    "0RB1"], ["1RF0", "1F0", "1RF1", "1F1", "1B0", "1SB0",
                                              "1B1", "1SB1"]])
    with pytest.raises(ScheduleError):
        simulate(cm, ranges, deadlock)


def test_record_false_gives_the_same_figures() -> None:
    cm, ranges = _balanced(3, 4, 1.0, 2.0, "1f1b", saved_bytes=[5.0] * 3)
    a, b = simulate(cm, ranges), simulate(cm, ranges, record=False)
    assert b.timeline is None
    assert (a.step_ms, a.stage_peak_bytes, a.stage_busy_ms) == (
        b.step_ms, b.stage_peak_bytes, b.stage_busy_ms)
    assert math.isclose(a.bubble_fraction, b.bubble_fraction)
    # stage_costs and the simulator see the same partition the same way
    sol = stage_costs(cm, [0, 1, 2, 3])
    assert list(a.stage_peak_bytes) == pytest.approx(sol.stage_memory_bytes)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("big_k,m", [(1, 1), (2, 3), (4, 8)])
def test_runtime_scales_every_action_and_adds_its_fixed_cost(schedule: str, big_k: int,
                                                              m: int) -> None:
    # balanced stages with actions of s*f + a and s*b + a: the closed form with those times
    scale, fixed, f, b = 1.3, 0.25, 1.0, 2.0
    cm, ranges = _balanced(big_k, m, f, b, schedule, layers_per_stage=2)
    res = simulate(replace(cm, runtime=Runtime(scale, fixed)), ranges)
    action = scale * (f + b) + 2 * fixed
    assert res.step_ms == pytest.approx((m + big_k - 1) * action)
    assert res.stage_busy_ms == pytest.approx([m * action] * big_k)
    # the partitioner sees the same per-micro-batch stage time the simulator runs
    costs = stage_costs(replace(cm, runtime=Runtime(scale, fixed)), (0, *(e for _, e in ranges)))
    assert costs.stage_ms == pytest.approx([action] * big_k)


def test_a_message_reaches_its_receiver_message_ms_after_its_send() -> None:
    # K=2, M=1 on two devices: F0, send (latency), delay, F1, B1, send back, delay, B0
    f, b, latency, delay = 1.0, 2.0, 0.5, 0.25
    prof = make_profile([f, f], [b, b], out_bytes=[8.0, 8.0])
    cm = CostModel(prof, 1, 1, stages=2, link=Link(math.inf, latency),
                   runtime=Runtime(message_ms=delay))
    res = simulate(cm, [(0, 1), (1, 2)])
    assert res.step_ms == pytest.approx(2 * (f + b) + 2 * (latency + delay))
    assert res.stage_comm_ms == pytest.approx([latency, latency])  # the delay is not the sender's
    # stages on one device exchange data for free: no message, no delay
    assert simulate(cm, [(0, 1), (1, 2)], devices=[0, 0]).step_ms == pytest.approx(2 * (f + b))
