import dataclasses
import math

import pytest

from partitioner.cost.holding import peak_rebuilt
from partitioner.cost.model import (
    WEIGHT_GRAD_SHARE,
    CostModel,
    bytes_per_param,
    split_microbatches,
)
from partitioner.formats.assumptions import LINKS, Link, Runtime
from partitioner.formats.profile import Profile, load_profile
from partitioner.schedule.generators import in_flight, make_schedule, peak_in_flight
from tests.synthetic import make_profile


def interpolate(sizes: list[int], values: list[float], b: float) -> float:
    """A one-layer profile's fwd_ms at micro-batch size b, as the cost model reads it."""
    prof = make_profile([1.0], sizes=sizes)
    layer = prof.layers[0]
    prof = dataclasses.replace(prof, layers=(dataclasses.replace(layer, fwd_ms=tuple(values)),))
    return float(CostModel(prof, 1, 1).layer_array("fwd_ms", b)[0])


def test_interpolation_is_piecewise_linear_not_proportional() -> None:
    sizes = [1, 2, 4, 8]
    flat_then_linear = [1.0, 1.0, 1.0, 2.0]  # launch-bound up to b=4, then linear
    assert interpolate(sizes, flat_then_linear, 3) == 1.0
    assert interpolate(sizes, flat_then_linear, 6) == 1.5
    assert interpolate(sizes, flat_then_linear, 16) == 4.0  # extrapolates the last segment
    assert interpolate(sizes, [4.0, 3.0, 1.0, 0.5], 0.5) == 4.5
    assert interpolate([1, 2], [2.0, 1.0], 10) == 0.0  # never below zero
    assert interpolate([4], [2.0], 8) == 4.0  # one size: proportional


def test_h200_gpt_is_launch_bound_at_small_b() -> None:
    cm1 = CostModel(load_profile("h200/gpt2-medium"), 1, 1)
    cm4 = CostModel(load_profile("h200/gpt2-medium"), 4, 1)
    t1, t4 = cm1.stage_compute_ms(1, 25, 0), cm4.stage_compute_ms(1, 25, 0)
    assert t4 < 1.5 * t1  # four times the samples, far less than four times the time


def test_split_microbatches() -> None:
    assert split_microbatches(16, 4) == [4, 4, 4, 4]
    assert split_microbatches(10, 4) == [3, 3, 2, 2]
    assert split_microbatches(5, 5) == [1] * 5
    with pytest.raises(ValueError, match="B=3 is smaller than M=4"):
        split_microbatches(3, 4)
    with pytest.raises(ValueError, match="M=0"):
        split_microbatches(3, 0)


def test_bytes_per_param() -> None:
    assert bytes_per_param("bfloat16", "adam") == 16  # 2 w + 2 g + 4 m + 4 v + 4 master
    assert bytes_per_param("float32", "adam") == 16  # 4 w + 4 g + 4 m + 4 v
    assert bytes_per_param("float32", "sgd") == 12
    assert bytes_per_param("float16", "none") == 4
    with pytest.raises(ValueError, match="dtype 'int3'"):
        bytes_per_param("int3", "adam")


def test_link_transfer() -> None:
    link = Link(bandwidth_gbps=10.0, latency_ms=0.5)
    assert link.transfer_ms(10**9) == pytest.approx(100.5)
    assert link.transfer_ms(0) == 0.0
    assert LINKS["free"].transfer_ms(10**12) == 0.0


def test_stage_figures_match_hand_computation() -> None:
    prof = make_profile([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], param_bytes=[400, 0, 800],
                        out_bytes=[1e9, 2e9, 3e9], saved_bytes=[10, 20, 30], dtype="float32")
    cm = CostModel(prof, global_batch=4, microbatches=4, stages=2, recompute="except_last",
                   link=Link(10.0, 1.0), optimizer="sgd")
    assert cm.microbatch_size == 1
    assert cm.stage_compute_ms(0, 2, 0) == 1 + 2 + 2 + 4 + (1 + 2)  # recomputes
    assert cm.stage_compute_ms(2, 3, 1) == 3 + 6  # last stage keeps activations
    assert cm.stage_comm_ms(0, 2) == pytest.approx(1 + 200)  # sends 2e9 bytes of layer 1
    assert cm.stage_comm_ms(2, 3) == pytest.approx(1 + 200)  # returns that gradient
    # sgd in fp32: 12 bytes per 4-byte parameter
    state0, state1 = 3 * 400, 3 * 800
    assert cm.stage_memory_bytes(0, 2, 0) == state0 + 4 * 0 + (10 + 20)  # stash: layer 0 input 0
    assert cm.stage_memory_bytes(2, 3, 1) == state1 + 4 * 30  # M micro-batches of saved
    one_f = CostModel(prof, 4, 4, stages=2, recompute="never", schedule="1f1b",
                      optimizer="none")
    assert one_f.in_flight(0) == 2 and one_f.in_flight(1) == 1
    assert one_f.stage_memory_bytes(0, 2, 0) == 2 * 400 + 2 * 30


def test_recompute_stash_uses_stage_input() -> None:
    prof = make_profile([1.0, 1.0], in_bytes=[5.0, 7.0], saved_bytes=[100, 100])
    cm = CostModel(prof, 3, 3, stages=2, recompute="always", optimizer="none")
    assert cm.stage_memory_bytes(1, 2, 1) == 3 * 7 + 100


def test_invalid_configuration() -> None:
    prof = make_profile([1.0])
    with pytest.raises(ValueError, match="recompute 'sometimes'"):
        CostModel(prof, 1, 1, recompute="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="K=0"):
        CostModel(prof, 1, 1, stages=0)
    assert math.isinf(LINKS["free"].bandwidth_gbps)


def test_runtime_scales_layer_times_and_charges_each_action() -> None:
    prof = make_profile([1.0, 2.0], [3.0, 4.0])
    base = CostModel(prof, 2, 2, stages=1, recompute="always")
    run = CostModel(prof, 2, 2, stages=1, recompute="always", runtime=Runtime(1.5, 0.2))
    assert run.layer_array("fwd_ms") == pytest.approx(1.5 * base.layer_array("fwd_ms"))
    assert run.layer_array("bwd_ms") == pytest.approx(1.5 * base.layer_array("bwd_ms"))
    # F and B (the recomputed forward runs inside B): two fixed costs per micro-batch
    assert run.stage_compute_ms(0, 2, 0) == pytest.approx(
        1.5 * base.stage_compute_ms(0, 2, 0) + 2 * 0.2)
    with pytest.raises(ValueError, match="compute_scale=0"):
        Runtime(0.0)
    with pytest.raises(ValueError, match="action_ms=-1"):
        Runtime(1.0, -1.0)
    with pytest.raises(ValueError, match="message_ms=nan"):
        Runtime(1.0, 0.0, float("nan"))


def _split_profile() -> Profile:
    """Layer 0 measured I/W (summing to more than its bwd), layer 1 with parameters, layer 2
    without; sizes 1 and 2."""
    prof = make_profile([1.0, 1.0, 1.0], [2.0, 5.0, 3.0], param_bytes=[8, 8, 0], sizes=(1, 2))
    first = dataclasses.replace(prof.layers[0], bwd_input_ms=(1.5, 2.5), bwd_weight_ms=(0.75, 1.0))
    return dataclasses.replace(prof, layers=(first, *prof.layers[1:]))


def test_split_backward_is_measured_or_the_stated_rule() -> None:
    cm = CostModel(_split_profile(), 3, 1, schedule="zb-h1")  # b = 3: extrapolated
    inputs, weights = cm.layer_array("bwd_input_ms"), cm.layer_array("bwd_weight_ms")
    bwd = cm.layer_array("bwd_ms")
    assert inputs[0] == pytest.approx(3.5) and weights[0] == pytest.approx(1.25)  # measured
    assert weights[1] == pytest.approx(WEIGHT_GRAD_SHARE * bwd[1])  # with parameters
    assert inputs[1] + weights[1] == pytest.approx(bwd[1])
    assert (inputs[2], weights[2]) == (bwd[2], 0.0)  # no parameters: no weight gradient
    assert cm.backward_ms() == pytest.approx(inputs + weights)
    assert cm.splits_backward and cm.compute_actions == 3
    assert cm.stage_compute_ms(0, 3, 0) == pytest.approx(3 * 3.0 + float(sum(inputs + weights)))
    plain = CostModel(_split_profile(), 3, 1, schedule="1f1b")
    assert plain.backward_ms() is plain.layer_array("bwd_ms")
    assert plain.stage_compute_ms(0, 3, 0) == pytest.approx(9.0 + float(sum(bwd)))


def test_split_backward_takes_the_runtime_and_the_launch_floor() -> None:
    prof = _split_profile()
    prof = dataclasses.replace(prof, layers=tuple(dataclasses.replace(lay, launch_ms=(1.4, 1.4))
                                                  for lay in prof.layers))
    run = Runtime(2.0, 0.5)
    cm = CostModel(prof, 1, 1, schedule="zb-h1", runtime=run, recompute="always")
    # b = 1: measured I 1.5, W 0.75 -> floored to 1.4; rule on layer 1: I 3, W 2; layer 2: W 0
    assert cm.layer_array("bwd_input_ms") == pytest.approx([2 * 1.5, 2 * 3.0, 2 * 3.0])
    assert cm.layer_array("bwd_weight_ms") == pytest.approx([2 * 1.4, 2 * 2.0, 0.0])
    # F, I, W each pay action_ms; the recomputed forward runs inside I
    fwd = 2 * 1.4
    assert cm.stage_compute_ms(0, 3, 0) == pytest.approx(
        3 * fwd * 2 + float(sum(cm.backward_ms())) + 3 * 0.5)


def test_stages_per_rank_is_checked_and_zbv_implies_two() -> None:
    prof = make_profile([1.0] * 6)
    assert CostModel(prof, 4, 4, stages=4, schedule="zbv").stages_per_rank == 2
    cm = CostModel(prof, 4, 4, stages=6, schedule="interleaved", stages_per_rank=3)
    assert cm.holding.rank_of == (0, 1, 0, 1, 0, 1)
    for k in range(6):
        assert cm.in_flight(k) == in_flight("interleaved", k, 6, 4, stages_per_rank=3)
        assert cm.in_flight(k) == peak_in_flight(make_schedule("interleaved", 6, 4, 3))[k]
    for schedule, stages, v, words in [("gpipe", 4, 2, "use V=1"), ("zbv", 3, 2, "divide"),
                                       ("interleaved", 4, 3, "V must divide K"),
                                       ("zbv", 4, 4, "--stages-per-rank 2")]:
        with pytest.raises(ValueError, match=words):
            CostModel(prof, 4, 4, stages=stages, schedule=schedule,  # type: ignore[arg-type]
                      stages_per_rank=v)


@pytest.mark.parametrize("schedule,big_k,v", [("zb-h1", 3, 1), ("zbv", 4, 2),
                                              ("interleaved", 4, 2), ("1f1b", 3, 1)])
def test_memory_holds_to_w_and_a_rank_sums_its_stages(schedule: str, big_k: int,
                                                      v: int) -> None:
    prof = make_profile([1.0] * big_k, param_bytes=[40] * big_k, saved_bytes=[100.0] * big_k,
                        in_bytes=[3.0] * big_k)
    m = 6
    sched = make_schedule(schedule, big_k, m, v)
    ranges = [(k, k + 1) for k in range(big_k)]
    for recompute in ("never", "always"):
        cm = CostModel(prof, m, m, stages=big_k, schedule=schedule,  # type: ignore[arg-type]
                       stages_per_rank=v, recompute=recompute,  # type: ignore[arg-type]
                       optimizer="none")
        for k in range(big_k):
            held, rebuilt = peak_in_flight(sched)[k], peak_rebuilt(sched)[k]
            acts = held * 3.0 + rebuilt * 100.0 if recompute == "always" else held * 100.0
            assert cm.stage_memory_bytes(k, k + 1, k) == 2 * 40 + acts
        ranks = cm.rank_memory_bytes(ranges)
        assert len(ranks) == big_k // v
        for r, total in enumerate(ranks):
            assert total == sum(cm.stage_memory_bytes(k, k + 1, k) for k in range(big_k)
                                if sched.rank_of[k] == r)
    with pytest.raises(ValueError, match="1 stage ranges given"):
        cm.rank_memory_bytes(ranges[:1])
