"""The simulator on every schedule against closed forms: interleaved 1F1B, ZB-H1 and ZB-V steps
with free links and equal stages, ZB-H1's memory, busy time per rank, free messages within a
rank, rank devices, and memory replayed from F to W."""

import dataclasses
import itertools
import math

import pytest

from partitioner.cost.model import CostModel
from partitioner.formats.assumptions import Link, Runtime
from partitioner.formats.profile import Profile
from partitioner.formats.timeline import Event
from partitioner.schedule.generators import make_schedule, one_f_one_b
from partitioner.schedule.ir import Schedule, lower
from partitioner.simulator.engine import SimResult, simulate
from tests.synthetic import make_profile


def split_profile(big_k: int, f: float, i: float, w: float, saved: float = 0.0,
                  stash: float = 0.0, out: float = 0.0, sizes: tuple[int, ...] = (1,)) -> Profile:
    """One layer per stage with F = f, and a measured split backward I = i, W = w (B = i + w);
    ``saved`` activations, a stage input of ``stash`` bytes, ``out`` bytes sent on."""
    prof = make_profile([f] * big_k, [i + w] * big_k, param_bytes=[4] * big_k,
                        saved_bytes=[saved] * big_k, in_bytes=[stash] * big_k,
                        out_bytes=[out] * big_k, sizes=sizes)
    scale = [s / sizes[0] for s in sizes]
    layers = tuple(dataclasses.replace(lay, bwd_input_ms=tuple(i * x for x in scale),
                                       bwd_weight_ms=tuple(w * x for x in scale))
                   for lay in prof.layers)
    return dataclasses.replace(prof, layers=layers)


def run(prof: Profile, schedule: str, big_k: int, m: int, v: int = 1, batch: int | None = None,
        **kw: object) -> tuple[CostModel, SimResult]:
    cm = CostModel(prof, batch or m, m, stages=big_k, schedule=schedule,  # type: ignore[arg-type]
                   stages_per_rank=v, **kw)  # type: ignore[arg-type]
    return cm, simulate(cm, [(k, k + 1) for k in range(big_k)])


def check_events(res: SimResult, sched: Schedule, devices: list[int] | None = None) -> None:
    """Actions on one device never overlap; every dependency of the split backward holds:
    F(k,i) after F(k-1,i); B or I (k,i) after the input gradient of (k+1,i) and after F(k,i);
    W(k,i) after I(k,i)."""
    tl = res.timeline
    assert tl is not None
    devices = devices or list(sched.rank_of)
    by_device: dict[int, list[Event]] = {}
    end = {}
    for e in tl.events:
        by_device.setdefault(devices[e.action.stage], []).append(e)
        end[e.action.kind, e.action.stage, e.action.microbatch] = e.end_ms
    for evs in by_device.values():
        evs.sort(key=lambda e: e.start_ms)
        for a, b in itertools.pairwise(evs):
            assert a.end_ms <= b.start_ms + 1e-9, (a, b)
    for e in tl.events:
        kind, k, i = e.action.kind, e.action.stage, e.action.microbatch
        if kind == "F" and k > 0:
            assert e.start_ms >= end["F", k - 1, i] - 1e-9
        if kind in ("B", "I"):
            assert e.start_ms >= end["F", k, i] - 1e-9
            if k < tl.stages - 1:
                grad = sched.grad_action(k + 1, i).kind
                assert e.start_ms >= end[grad, k + 1, i] - 1e-9
        if kind == "W":
            assert e.start_ms >= end["I", k, i] - 1e-9


@pytest.mark.parametrize("ranks,v,rounds", [(1, 1, 3), (2, 2, 1), (2, 2, 3), (3, 2, 2),
                                            (2, 3, 2), (4, 2, 2), (4, 4, 1), (3, 1, 2)])
@pytest.mark.parametrize("f,b", [(1.0, 2.0), (0.75, 1.25)])
def test_interleaved_takes_m_t_plus_a_vth_of_the_fill(ranks: int, v: int, rounds: int,
                                                      f: float, b: float) -> None:
    """R ranks, V stages each, M a multiple of R: M t + (R-1) t / V, t = V (f + b) being one
    rank's work per micro-batch."""
    big_k, m = ranks * v, rounds * ranks
    prof = make_profile([f] * big_k, [b] * big_k)
    _, res = run(prof, "interleaved", big_k, m, v)
    t = v * (f + b)
    assert res.step_ms == pytest.approx(m * t + (ranks - 1) * t / v)
    assert res.rank_busy_ms == pytest.approx([m * t] * ranks)
    assert res.bubble_fraction == pytest.approx(1 - m * t / res.step_ms)
    assert res.rank_of == make_schedule("interleaved", big_k, m, v).placement
    check_events(res, make_schedule("interleaved", big_k, m, v))


@pytest.mark.parametrize("big_k,m", [(1, 1), (1, 4), (2, 2), (2, 5), (3, 3), (4, 4), (4, 9),
                                     (6, 8)])
def test_zb_h1_takes_a_third_of_1f1bs_bubble_at_its_memory(big_k: int, m: int) -> None:
    """F = I = W = u per stage, M >= K: ZB-H1 3Mu + (K-1)u, 1F1B (B = 2u) 3(M+K-1)u; ZB-H1's
    replayed peak on every stage is at most K micro-batches' saved bytes, 1F1B's peak (stage
    0's), and it is the cost model's closed form."""
    u, saved = 0.5, 100.0
    prof = split_profile(big_k, u, u, u, saved=saved)
    cm, zb = run(prof, "zb-h1", big_k, m, optimizer="none")
    _, plain = run(prof, "1f1b", big_k, m, optimizer="none")
    assert zb.step_ms == pytest.approx(3 * m * u + (big_k - 1) * u)
    assert plain.step_ms == pytest.approx(3 * (m + big_k - 1) * u)
    state = 2 * 4.0  # weight + gradient, float32, no optimizer
    assert max(zb.stage_peak_bytes) <= state + big_k * saved
    assert max(plain.stage_peak_bytes) == state + big_k * saved
    assert list(zb.stage_peak_bytes) == [cm.stage_memory_bytes(k, k + 1, k)
                                         for k in range(big_k)]
    assert zb.stage_busy_ms == pytest.approx([3 * m * u] * big_k)
    check_events(zb, make_schedule("zb-h1", big_k, m))


@pytest.mark.parametrize("ranks,rounds", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 1), (3, 2),
                                          (4, 2)])
def test_zbv_takes_6mu_plus_the_fill(ranks: int, rounds: int) -> None:
    """K = 2R stages in the V shape, F = I = W = u per stage, M a multiple of R: 6Mu + (R-1)u;
    each rank works 6Mu; the turn on rank R-1 and the ends on rank 0 send nothing."""
    u, big_k, m = 0.25, 2 * ranks, rounds * ranks
    prof = split_profile(big_k, u, u, u, out=1e6)
    _, res = run(prof, "zbv", big_k, m)
    assert res.step_ms == pytest.approx(6 * m * u + (ranks - 1) * u)
    assert res.rank_busy_ms == pytest.approx([6 * m * u] * ranks)
    check_events(res, make_schedule("zbv", big_k, m))


def test_messages_within_a_rank_are_free() -> None:
    """ZB-V on a slow link: every stage pays for its sends except where the next stage is on
    its own rank (stage R-1 to R forward, R to R-1 back)."""
    ranks, m, c = 3, 3, 2.0  # 1e6 bytes at 1 GB/s: 1 ms + 1 ms latency
    big_k = 2 * ranks
    prof = split_profile(big_k, 1.0, 1.0, 1.0, out=1e6)
    _, res = run(prof, "zbv", big_k, m, link=Link(1.0, 1.0))
    sends = [(k < big_k - 1) + (k > 0) for k in range(big_k)]  # SF and SB per micro-batch
    sends[ranks - 1] -= 1  # its SF stays on rank R-1
    sends[ranks] -= 1  # and so does stage R's SB
    assert res.stage_comm_ms == pytest.approx([m * c * n for n in sends])
    four = split_profile(4, 1.0, 1.0, 1.0, out=1e6)
    one = simulate(dataclasses.replace(res_cm(four, "interleaved", 4, m, 4), link=Link(1.0, 1.0)),
                   [(k, k + 1) for k in range(4)])
    assert one.stage_comm_ms == (0.0,) * 4  # R = 1: every message stays on the one rank


def res_cm(prof: Profile, schedule: str, big_k: int, m: int, v: int) -> CostModel:
    return CostModel(prof, m, m, stages=big_k, schedule=schedule,  # type: ignore[arg-type]
                     stages_per_rank=v)


@pytest.mark.parametrize("schedule,big_k,v", [("zb-h1", 3, 1), ("zbv", 4, 2),
                                              ("interleaved", 6, 3), ("gpipe", 3, 1)])
def test_busy_time_per_rank_is_the_sum_of_its_actions(schedule: str, big_k: int,
                                                      v: int) -> None:
    """Uneven micro-batches (B = 7, M = 3: 3, 2, 2), recompute and a runtime: each rank is busy
    exactly the sum of its actions, each as the cost model prices it at its size."""
    prof = split_profile(big_k, 1.0, 0.75, 0.5, sizes=(1, 4))
    runtime = Runtime(1.5, 0.125)
    cm = CostModel(prof, 7, 3, stages=big_k, schedule=schedule,  # type: ignore[arg-type]
                   stages_per_rank=v, recompute="except_last", runtime=runtime)
    res = simulate(cm, [(k, k + 1) for k in range(big_k)])
    sched = make_schedule(schedule, big_k, 3, v)
    expected = [0.0] * sched.ranks
    for r, row in enumerate(sched.actions):
        for a in row:
            b = (3, 2, 2)[a.microbatch]
            f = float(cm.layer_array("fwd_ms", b)[a.stage])
            again = f if cm.recomputes(a.stage) else 0.0
            cost = {"F": f, "B": float(cm.layer_array("bwd_ms", b)[a.stage]) + again,
                    "I": float(cm.layer_array("bwd_input_ms", b)[a.stage]) + again,
                    "W": float(cm.layer_array("bwd_weight_ms", b)[a.stage])}[a.kind]
            expected[r] += cost + runtime.action_ms
    assert res.rank_busy_ms == pytest.approx(expected)
    tl = res.timeline
    assert tl is not None
    per_rank = [0.0] * sched.ranks
    for e in tl.events:
        if e.action.kind in ("F", "B", "I", "W"):
            per_rank[sched.rank_of[e.action.stage]] += e.duration_ms
    assert per_rank == pytest.approx(expected)
    check_events(res, sched)


def test_recompute_runs_in_i_and_the_rebuild_is_held_to_w() -> None:
    """ZB-H1, K=2, M=2, both stages recomputing: I costs bwd_input + fwd, W bwd_weight; stage
    1 runs 1F0 1I0 1F1 1I1 1W0 1W1, so after 1I1 it holds both stashes and both rebuilt."""
    prof = split_profile(2, 1.0, 2.0, 0.5, saved=100.0, stash=7.0)
    cm, res = run(prof, "zb-h1", 2, 2, recompute="always", optimizer="none")
    tl = res.timeline
    assert tl is not None
    length = {str(e.action): e.duration_ms for e in tl.events}
    assert (length["1I0"], length["1W0"], length["0F1"]) == (3.0, 0.5, 1.0)
    state = 2 * 4.0
    assert res.stage_peak_bytes[1] == state + 2 * 7.0 + 2 * 100.0
    assert res.stage_peak_bytes == tuple(cm.stage_memory_bytes(k, k + 1, k) for k in (0, 1))
    after = {str(e.action): e.memory_bytes for e in tl.events}
    assert after["1I1"] == state + 2 * 7.0 + 2 * 100.0
    assert after["1W0"] == state + 7.0 + 100.0 and after["1W1"] == state


@pytest.mark.parametrize("schedule,big_k,v", [("zbv", 4, 2), ("zbv", 6, 2),
                                              ("interleaved", 4, 2), ("interleaved", 6, 3)])
def test_a_ranks_memory_is_its_stages_together(schedule: str, big_k: int, v: int) -> None:
    """Without recompute every change of memory is an event's: sweeping the events of a rank
    in time order (each stage's latest figure, summed) finds its replayed peak; it lies
    between its largest stage's peak and the sum of them (the cost model's closed form)."""
    prof = make_profile([1.0 + k / 4 for k in range(big_k)], param_bytes=[40] * big_k,
                        saved_bytes=[100.0 * (k + 1) for k in range(big_k)])
    cm, res = run(prof, schedule, big_k, 5, v)
    sched = make_schedule(schedule, big_k, 5, v)
    tl = res.timeline
    assert tl is not None
    ranges = [(k, k + 1) for k in range(big_k)]
    for r in range(sched.ranks):
        stages = [k for k in range(big_k) if sched.rank_of[k] == r]
        latest = {k: float(cm.param_state_bytes()[k]) for k in stages}
        swept = sum(latest.values())
        for e in sorted((e for e in tl.events if e.action.stage in stages
                         and e.memory_bytes is not None), key=lambda e: e.start_ms):
            latest[e.action.stage] = e.memory_bytes  # type: ignore[assignment]
            swept = max(swept, sum(latest.values()))
        assert res.rank_peak_bytes[r] == pytest.approx(swept)
        assert max(res.stage_peak_bytes[k] for k in stages) <= res.rank_peak_bytes[r]
        assert res.rank_peak_bytes[r] <= cm.rank_memory_bytes(ranges)[r] + 1e-6
    assert list(res.stage_peak_bytes) == [cm.stage_memory_bytes(k, k + 1, k)
                                          for k in range(big_k)]


def test_devices_keep_a_ranks_stages_together() -> None:
    prof = split_profile(4, 1.0, 1.0, 1.0)
    cm = res_cm(prof, "zbv", 4, 4, 2)
    ranges = [(k, k + 1) for k in range(4)]
    with pytest.raises(ValueError, match=r"rank 0 runs stages \[0, 3\], but devices \[0, 2\]"):
        simulate(cm, ranges, devices=[0, 1, 1, 2])
    # both ranks on one device: one action at a time, all of the work back to back
    res = simulate(cm, ranges, devices=[0, 0, 0, 0])
    assert res.step_ms == pytest.approx(4 * 4 * 3.0)
    check_events(res, make_schedule("zbv", 4, 4), [0, 0, 0, 0])
    assert simulate(cm, ranges).step_ms < res.step_ms


@pytest.mark.parametrize("schedule,big_k,v", [("zb-h1", 3, 1), ("zbv", 4, 2),
                                              ("interleaved", 4, 2)])
def test_default_plain_and_lowered_schedules_agree(schedule: str, big_k: int, v: int) -> None:
    prof = split_profile(big_k, 1.0, 0.5, 0.75, saved=10.0, stash=3.0, out=5e5, sizes=(1, 2))
    cm = CostModel(prof, 9, 5, stages=big_k, schedule=schedule,  # type: ignore[arg-type]
                   stages_per_rank=v, recompute="except_last", link=Link(1.0, 0.25),
                   runtime=Runtime(1.0, 0.0, 0.125))
    ranges = [(k, k + 1) for k in range(big_k)]
    sched = make_schedule(schedule, big_k, 5, v)
    default = simulate(cm, ranges)
    assert simulate(cm, ranges, sched) == default
    assert simulate(cm, ranges, lower(sched)) == default
    assert math.isfinite(default.step_ms) and default.step_ms > 0


def test_unsplit_schedules_keep_their_figures() -> None:
    """1F1B is the interleaved schedule with V = 1, and the plain generator's figures."""
    prof = split_profile(3, 1.0, 1.0, 2.0, saved=5.0, out=1e6)
    base = CostModel(prof, 6, 6, stages=3, schedule="1f1b", link=Link(2.0, 0.5))
    inter = dataclasses.replace(base, schedule="interleaved")
    ranges = [(k, k + 1) for k in range(3)]
    a, b = simulate(base, ranges), simulate(inter, ranges, one_f_one_b(3, 6))
    assert (a.step_ms, a.stage_busy_ms, a.stage_peak_bytes) == (b.step_ms, b.stage_busy_ms,
                                                                b.stage_peak_bytes)
    assert a.rank_peak_bytes == a.stage_peak_bytes and a.rank_of == ()
