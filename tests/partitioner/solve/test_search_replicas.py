"""The search over replicas D: both ends, the devices, the memory limit with D, even shares,
and pruning (``keep``) that leaves the reported rows and the best plan exactly as they were."""

import pytest

from partitioner.formats.assumptions import LINKS, Runtime
from partitioner.formats.device import load_device_model
from partitioner.formats.profile import load_profile
from partitioner.formats.topology import Topology
from partitioner.report.plans import search_table
from partitioner.simulator.engine import simulate
from partitioner.solve.bounds import work_bound_ms
from partitioner.solve.search import Candidate, _partitioned_bound, search
from tests.synthetic import make_profile

TOPO = Topology(1, 4, LINKS["nvlink"], LINKS["ib"])


def _row(c: Candidate) -> tuple[object, ...]:
    return (c.step_ms, c.stages, c.replicas, c.microbatches, c.schedule, c.recompute,
            c.peak_bytes, c.solution.boundaries, c.placement)


@pytest.fixture(scope="module", params=[None, "h200"])
def full(request):  # type: ignore[no-untyped-def]
    # the profile as it is, and under the H200 device model (two clocks: the bounds sum each)
    prof = load_profile("h200/gpt2-medium")
    runtime = Runtime(device=load_device_model(request.param)) if request.param else None
    return prof, search(prof, 0, 24, float(prof.device.memory_bytes or 0), topology=TOPO,
                        schedules=("gpipe", "1f1b", "zb-h1", "zbv", "interleaved", "synth"),
                        runtime=runtime)


def test_both_ends_every_candidate_fits_the_devices_and_d_divides_b(full) -> None:  # type: ignore[no-untyped-def]
    _, res = full
    assert res.replicas == (1, 2, 3, 4)  # every D dividing B=24 up to 4 devices
    assert res.best_where(lambda c: c.replicas == 1) is not None
    assert res.best_where(lambda c: c.stages == 1 and c.replicas == 4) is not None
    for c in res.candidates:
        assert c.ranks * c.replicas <= TOPO.devices
        assert 24 % c.replicas == 0
        assert c.cost_model.microbatch_size == -(-24 // (c.replicas * c.microbatches))


@pytest.mark.parametrize("keep", [1, 3, 10])
def test_pruning_keeps_the_rows_the_ends_and_the_plan(full, keep: int) -> None:  # type: ignore[no-untyped-def]
    prof, res = full
    pruned = search(prof, 0, 24, res.memory_limit_bytes, topology=TOPO, keep=keep,
                    schedules=("gpipe", "1f1b", "zb-h1", "zbv", "interleaved", "synth"),
                    runtime=res.candidates[0].cost_model.runtime)
    assert pruned.skipped > 0 and pruned.tried == res.tried
    top = max(keep, 1)
    assert [_row(c) for c in pruned.candidates[:top]] == [_row(c) for c in res.candidates[:top]]
    for keep_if in (lambda c: c.replicas == 1, lambda c: c.stages == 1):
        assert _row(pruned.best_where(keep_if)) == _row(res.best_where(keep_if))  # type: ignore[arg-type]
    assert pruned.best_plan() == res.best_plan()
    rows = search_table(pruned, top).split("configurations tried")[0]
    assert rows == search_table(res, top).split("configurations tried")[0]


def test_the_bounds_never_exceed_the_simulated_step(full) -> None:  # type: ignore[no-untyped-def]
    _, res = full
    for c in res.candidates:
        if c.synthesised is None:
            links = [c.cost_model.allreduce_link]
            assert work_bound_ms(c.cost_model, links) <= c.step_ms * (1 + 1e-9)
            assert _partitioned_bound(c.cost_model, c.solution) <= c.step_ms * (1 + 1e-9)
            assert simulate(c.cost_model, nodes=c.solution.nodes,
                            record=False).step_ms == c.step_ms


def test_a_limit_that_only_sharded_replicas_meet_is_found() -> None:
    # 4 layers of 1,000 parameter bytes (fp32, Adam: 4,000 bytes of state each, 2,000 + 2,000/D
    # with the optimizer sharded over D replicas); at most K = 4 stages on 8 devices
    prof = make_profile([1.0] * 4, param_bytes=[1000] * 4, saved_bytes=[1.0] * 4)
    topo = Topology(1, 8, LINKS["free"], LINKS["free"])
    kw = dict(schedules=("gpipe",), recompute=("never",), microbatches=(1,), topology=topo)
    res = search(prof, 0, 8, memory_limit_bytes=3500.0, shard_optimizer=True,
                 **kw)  # type: ignore[arg-type]
    assert res.candidates and res.infeasible > 0
    assert {(c.stages, c.replicas) for c in res.candidates} == {(4, 2)}  # 3,000 + activations
    assert all(c.peak_bytes <= 3500.0 for c in res.candidates)
    assert not search(prof, 0, 8, memory_limit_bytes=3500.0, **kw).candidates  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not split"):
        search(prof, 0, 8, replicas=(3,), **kw)  # type: ignore[arg-type]
