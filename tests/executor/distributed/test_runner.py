"""The distributed runner against the plain model (the oracle), on local gloo ranks.

Spawning is slow, so one group of 4 ranks runs every configuration: for K = 1..4 the first K
ranks form the pipeline (a subgroup) and loop over M, recompute and schedule; then the first R
ranks run the schedules with several stages per rank or a split backward (``SPREAD``); the test
process compares what each rank returns with the plain model. Faults get their own small
groups, and so does the ordered transport (NCCL's: it needs the whole world), run on gloo with
the tags dropped.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from executor.distributed.runner import DistributedRunner
from executor.distributed.spawn import RankFailure, spawn_local
from executor.distributed.transport import PeerError, decode_header, encode_header, pack, unpack
from executor.runtime.interpreter import Packet
from executor.runtime.local import LocalRunner
from executor.runtime.pipeline import manual_plan
from executor.runtime.stage import Stage, build_layers
from partitioner.formats.plan import Plan, PlanError
from tests import toy_models as em
from tests.synthetic import listed_schedule

B, STEPS, LR = 8, 5, 0.1
CONFIGS = list(itertools.product((1, 2, 3, 5, 8), ("never", "always", "except_last"),
                                 ("gpipe", "1f1b")))
# The MLP runs every configuration; the GPT-like model (tuples, token ids) the uneven ones,
# which is where its extra paths (several tensors per message, integers) could go wrong.
MODEL_CONFIGS = {"mlp": CONFIGS, "gpt": [c for c in CONFIGS if c[0] in (3, 5)]}
MODELS: dict[str, tuple[Any, int, Any, Any]] = {
    "mlp": (em.mlp_layer, em.MLP_LAYERS, em.mlp_batch, nn.functional.mse_loss),
    "gpt": (em.gpt_layer, em.GPT_LAYERS, em.gpt_batch, em.lm_loss),
}


# Several stages per rank and split backwards, on the first R ranks: (R, K, schedule, recompute,
# models), each with B=7 samples in M=3 micro-batches (3, 2, 2). "listed" is list-scheduled from
# unequal stage times in the V shape (tests.synthetic).
SPREAD_B, SPREAD_M = 7, 3
SPREAD: list[tuple[int, int, str, str, tuple[str, ...]]] = [
    (1, 2, "zbv", "except_last", ("mlp",)),  # both stages on one rank: only the mailbox
    (2, 4, "interleaved", "never", ("mlp", "gpt")),
    (2, 4, "interleaved", "always", ("mlp",)),
    (2, 4, "zbv", "except_last", ("mlp", "gpt")),
    (2, 4, "zbv", "always", ("gpt",)),
    (2, 2, "zb-h1", "always", ("mlp", "gpt")),
    (2, 4, "listed", "never", ("mlp", "gpt")),
    (3, 3, "zb-h1", "except_last", ("gpt",)),
    (3, 6, "zbv", "never", ("mlp",)),
    (4, 4, "zb-h1", "never", ("mlp",)),
]


def cuts(num_layers: int, stages: int) -> list[int]:
    return [round(k * num_layers / stages) for k in range(stages + 1)]


def spread_plan(name: str, stages: int, schedule: str, recompute: str) -> Plan:
    num_layers = MODELS[name][1]
    actions = listed_schedule(stages, SPREAD_M) if schedule == "listed" else None
    per_rank = 2 if schedule == "interleaved" else None
    return manual_plan(cuts(num_layers, stages), SPREAD_M, SPREAD_B, schedule, recompute,
                       stages_per_rank=per_rank, actions=actions)


def _train(name: str, stages: int, config: tuple[int, str, str], group: Any, *,
           samples: int = B, transport: Any = "auto", plan: Plan | None = None
           ) -> dict[str, Any]:
    """STEPS SGD steps of one configuration (or of ``plan``) on this rank's stages, on a
    batch of ``samples``: the first step's loss and gradients, the parameters at the end."""
    factory, num_layers, batch, loss_fn = MODELS[name]
    m, recompute, schedule = config
    if plan is None:
        plan = manual_plan(cuts(num_layers, stages), m, samples, schedule, recompute)
    runner = DistributedRunner(factory, plan, num_layers=num_layers, group=group,
                               transport=transport)
    params = runner.parameters()  # a stage of parameter-free layers has none
    opt = torch.optim.SGD(params, lr=LR) if params else None
    x, y = batch(samples)
    out: dict[str, Any] = {}
    for step in range(STEPS):
        if opt is not None:
            opt.zero_grad()
        result = runner.train_step(x, y, loss_fn)
        if step == 0:
            out["loss"] = None if result.loss is None else float(result.loss)
            out["grads"] = {n: p.grad.clone() for n, p in runner.module.named_parameters()
                            if p.grad is not None}
        if opt is not None:
            opt.step()
    out["params"] = {n: p.detach().clone() for n, p in runner.module.named_parameters()}
    out["forward"] = runner.forward(x)
    out["posted_early"] = runner.transport.post_early
    out["stages"] = runner.stage_indices
    return out


def _errors(group: Any) -> dict[str, str]:
    """Bad input on a 2-rank pipeline: each must fail before any communication."""
    found = {}
    cases = {
        "world": lambda: DistributedRunner(em.mlp_layer, manual_plan([0, 2, 4, 7], 2, B),
                                           group=group),
        "layers": lambda: DistributedRunner(em.mlp_layer, manual_plan([0, 3, 6], 2, B),
                                            num_layers=em.MLP_LAYERS, group=group),
        "device": lambda: DistributedRunner(em.mlp_layer, manual_plan([0, 3, 7], 2, B),
                                            device="cuda:7", group=group),
        "transport": lambda: DistributedRunner(em.mlp_layer, manual_plan([0, 3, 7], 2, B),
                                               group=group, transport="tagged"),  # type: ignore[arg-type]
        "ordered": lambda: DistributedRunner(em.mlp_layer, manual_plan([0, 3, 7], 2, B),
                                             group=group, transport="ordered"),
        "rows": lambda: DistributedRunner(em.mlp_layer, manual_plan(cuts(7, 6), 2, B, "zbv"),
                                          group=group),
    }
    for key, make in cases.items():
        try:
            make()
        except (ValueError, PlanError) as exc:
            found[key] = str(exc)
    runner = DistributedRunner(em.mlp_layer, manual_plan([0, 3, 7], 4, B), group=group)
    try:
        runner.train_step(*em.mlp_batch(3), nn.functional.mse_loss)
    except ValueError as exc:
        found["batch"] = str(exc)
    return found


def _timeline(group: Any, late_ms: float = 0.0) -> Any:
    """Two stages of one 30 ms layer each: a measured timeline with known durations. With
    ``late_ms``, rank 1 leaves the step's starting barrier that much later than rank 0."""
    plan = manual_plan([0, 1, 2], 3, 6, "gpipe", "never")
    runner = DistributedRunner(lambda i: em.Sleep(30.0), plan, group=group)
    x = torch.randn(6, 4)
    runner.train_step(x, x, nn.functional.mse_loss)  # warm-up
    barrier = dist.barrier

    def late_barrier(*args: Any, **kwargs: Any) -> Any:
        out = barrier(*args, **kwargs)
        time.sleep(late_ms / 1e3)
        return out

    if late_ms and dist.get_rank() == 1:
        dist.barrier = late_barrier
    try:
        return runner.train_step(x, x, nn.functional.mse_loss, timeline=True).timeline
    finally:
        dist.barrier = barrier


def _memory(group: Any) -> Any:
    """The MLP on two ranks under 1F1B (M=4): this rank's step memory and rank 0's timeline,
    with the same stages' figures in one process (LocalRunner) to match."""
    plan = manual_plan([0, 3, em.MLP_LAYERS], 4, 8, "1f1b", "never")
    x, y = em.mlp_batch(8)
    runner = DistributedRunner(em.mlp_layer, plan, group=group)
    result = runner.train_step(x, y, nn.functional.mse_loss, timeline=True)
    stages = [Stage(k, build_layers(em.mlp_layer, *r), "cpu")
              for k, r in enumerate(plan.layer_ranges())]
    _, local = LocalRunner(stages, "1f1b", 4).train_step(x, y, nn.functional.mse_loss)
    return result.activation_peak_bytes, result.allocated_peak_bytes, result.timeline, local


VARYING = (8, 5, 8, 6)  # batch sizes of successive steps: micro-batches shrink, then grow


def _varying(name: str, group: Any) -> list[dict[str, Any]]:
    """Steps whose micro-batches change size between steps (the receives posted from the
    previous step's sizes must still deliver each step's tensors): loss and gradients."""
    factory, num_layers, batch, loss_fn = MODELS[name]
    runner = DistributedRunner(factory, manual_plan(cuts(num_layers, 2), 2, B), group=group)
    out = []
    for b in VARYING:
        for p in runner.parameters():
            p.grad = None
        result = runner.train_step(*batch(b), loss_fn)
        out.append({"loss": None if result.loss is None else float(result.loss),
                    "grads": {n: p.grad.clone() for n, p in runner.module.named_parameters()
                              if p.grad is not None}})
    return out


def _sweep_rank() -> dict[Any, Any]:
    torch.manual_seed(0)
    rank, results = dist.get_rank(), {}
    for stages in range(1, 5):
        group = dist.new_group(list(range(stages)))  # every rank makes every group
        if rank < stages:
            start = time.perf_counter()
            for name, configs in MODEL_CONFIGS.items():
                for config in configs:
                    results[name, stages, config] = _train(name, stages, config, group)
            results["seconds", stages] = time.perf_counter() - start
            for ranks, big_k, schedule, recompute, names in SPREAD:
                if ranks != stages:
                    continue
                for name in names:
                    plan = spread_plan(name, big_k, schedule, recompute)
                    results["spread", big_k, schedule, recompute, name] = _train(
                        name, big_k, (0, "", ""), group, samples=SPREAD_B, plan=plan)
            if stages == 2:
                results["errors"] = _errors(group)
                results["timeline"] = _timeline(group)
                results["timeline_late"] = _timeline(group, late_ms=40.0)
                results["memory"] = _memory(group)
                for name in MODELS:
                    results["varying", name] = _varying(name, group)
    return results


def _oracle(name: str, samples: int = B) -> dict[str, Any]:
    factory, num_layers, batch, loss_fn = MODELS[name]
    model = nn.Sequential(*(factory(i) for i in range(num_layers)))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = batch(samples)
    out: dict[str, Any] = {}
    for step in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if step == 0:
            out["loss"] = float(loss.detach())
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["forward"] = model(x).detach()
    return out


@pytest.fixture(scope="module")
def sweep() -> list[dict[Any, Any]]:
    return spawn_local(_sweep_rank, 4, timeout_s=120, deadline_s=600)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Relative error of the whole tensor (norm-wise) within rtol."""
    return float((a - b).norm()) <= rtol * max(float(b.norm()), 1e-12)


def check_transparent(ranks: list[dict[str, Any]], oracle: dict[str, Any], where: str,
                      last: int = -1) -> None:
    """What the ranks of one configuration returned (``_train``) against the plain model;
    ``ranks[last]`` runs the last stage."""
    last = last % len(ranks)
    assert ranks[last]["loss"] == pytest.approx(oracle["loss"], rel=1e-5), where
    assert all(r["loss"] is None for j, r in enumerate(ranks) if j != last), where
    grads = {n: g for r in ranks for n, g in r["grads"].items()}
    params = {n: p for r in ranks for n, p in r["params"].items()}
    assert grads.keys() == oracle["grads"].keys(), where  # every layer on exactly one rank
    for n, g in oracle["grads"].items():
        assert close(grads[n], g), f"{where}: gradient of {n}"
        assert close(params[n], oracle["params"][n]), f"{where}: {n} after {STEPS} steps"
    assert all(r["forward"] is None for j, r in enumerate(ranks) if j != last)
    assert close(ranks[last]["forward"], oracle["forward"]), where


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_transparent_against_the_plain_model(sweep: list[dict[Any, Any]], name: str,
                                             stages: int) -> None:
    oracle = _oracle(name)
    for config in MODEL_CONFIGS[name]:
        ranks = [sweep[r][name, stages, config] for r in range(stages)]
        assert all(r["posted_early"] for r in ranks)  # gloo's default
        check_transparent(ranks, oracle, f"{name} K={stages} M, recompute, schedule = {config}")


@pytest.mark.timeout(600)
def test_several_stages_per_rank_and_split_backwards_are_transparent(
        sweep: list[dict[Any, Any]]) -> None:
    oracles = {name: _oracle(name, SPREAD_B) for name in MODELS}
    for big_r, big_k, schedule, recompute, names in SPREAD:
        for name in names:
            plan = spread_plan(name, big_k, schedule, recompute)
            sched = plan.build_schedule()
            ranks = [sweep[r]["spread", big_k, schedule, recompute, name] for r in range(big_r)]
            assert [r["stages"] for r in ranks] == [
                [k for k in range(big_k) if sched.rank_of[k] == r] for r in range(big_r)]
            assert all(r["posted_early"] for r in ranks)
            check_transparent(ranks, oracles[name], f"{name} R={big_r} K={big_k} {schedule} "
                                                    f"{recompute}", last=sched.rank_of[-1])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(MODELS))
def test_micro_batches_may_change_size_between_steps(sweep: list[dict[Any, Any]],
                                                     name: str) -> None:
    factory, num_layers, batch, loss_fn = MODELS[name]
    model = nn.Sequential(*(factory(i) for i in range(num_layers)))
    for step, b in enumerate(VARYING):
        model.zero_grad()
        loss = loss_fn(model(batch(b)[0]), batch(b)[1])
        loss.backward()
        ranks = [sweep[r]["varying", name][step] for r in range(2)]
        assert ranks[1]["loss"] == pytest.approx(float(loss.detach()), rel=1e-5), (step, b)
        grads = {n: g for r in ranks for n, g in r["grads"].items()}
        for n, p in model.named_parameters():
            assert p.grad is not None and close(grads[n], p.grad), f"step {step} (B={b}): {n}"


@pytest.mark.timeout(600)
def test_bad_input_fails_before_any_work(sweep: list[dict[Any, Any]]) -> None:
    for rank in (0, 1):
        errors = sweep[rank]["errors"]
        assert "the world has 2 ranks but the plan has K=3 stages" in errors["world"]
        assert "the plan covers 6 layers but the model has 7" in errors["layers"]
        assert "cuda:7" in errors["device"]
        assert "transport='tagged' is not one of ('auto', 'ordered', 'posted')" in errors[
            "transport"]
        assert "the ordered transport the pipeline must span the whole world" in errors[
            "ordered"]
        assert "the world has 2 ranks but the plan has K=6 stages on R=3 ranks, V=2 per " \
               "rank; start one rank per row of its schedule" in errors["rows"]
    assert "B=3 samples but the plan splits it into M=4" in sweep[0]["errors"]["batch"]


@pytest.mark.timeout(600)
def test_measured_timeline_shares_one_clock(sweep: list[dict[Any, Any]]) -> None:
    tl = sweep[0]["timeline"]
    assert tl is not None and tl.kind == "measured" and tl.stages == 2
    assert sorted(str(e.action) for e in tl.events if e.action.kind in "FB") == sorted(
        f"{k}{kind}{i}" for k in range(2) for kind in "FB" for i in range(3))
    ev = {str(e.action): e for e in tl.events}
    for k in range(2):
        row = tl.stage_events(k)
        assert all(a.end_ms <= b.start_ms + 1e-6 for a, b in itertools.pairwise(row))
    for i in range(3):
        assert ev[f"0F{i}"].duration_ms >= 29.0
        # aligned clocks: stage 1 cannot start a micro-batch before stage 0 has finished it
        assert ev[f"1F{i}"].start_ms >= ev[f"0F{i}"].end_ms - 3.0
        assert ev[f"0B{i}"].start_ms >= ev[f"1B{i}"].end_ms - 3.0
    assert tl.step_ms >= 4 * 30.0  # at least the fill and drain of one micro-batch


@pytest.mark.timeout(600)
def test_a_rank_leaving_the_barrier_late_stays_on_the_common_clock(
        sweep: list[dict[Any, Any]]) -> None:
    # rank 1 starts counting 40 ms after rank 0: on one host its events are moved onto
    # rank 0's clock, so causality holds exactly (counted from its own barrier exit, its
    # forward of micro-batch 0 would seem to start 40 ms before stage 0 had sent it)
    tl = sweep[0]["timeline_late"]
    ev = {str(e.action): e for e in tl.events}
    for i in range(3):
        assert ev[f"1F{i}"].start_ms >= ev[f"0F{i}"].end_ms
        assert ev[f"0B{i}"].start_ms >= ev[f"1B{i}"].end_ms
    assert ev["1F0"].start_ms >= 40.0  # rank 1 was asleep until then


def test_step_reports_each_stage_activation_peak(sweep: list[dict[Any, Any]]) -> None:
    """Each rank reports its stage's peak; rank 0's timeline has every stage's, equal to what
    the same stages hold in one process (a chain stage's input is its own copy either way)."""
    (peaks0, alloc0, tl, local), (peaks1, _, tl1, _) = sweep[0]["memory"], sweep[1]["memory"]
    assert set(peaks0) == {0} and set(peaks1) == {1} and alloc0 is None and tl1 is None
    assert min(peaks0[0], peaks1[1]) > 0
    assert tl.meta["stage_activation_peak_bytes"] == [peaks0[0], peaks1[1]]
    assert local.meta["stage_activation_peak_bytes"] == [peaks0[0], peaks1[1]]


# -- the ordered transport (NCCL's), run on gloo with the tags dropped ------------------------------

ORDERED_B = 7  # not a multiple of M: micro-batches of unequal sizes
ORDERED_CONFIGS = list(itertools.product((2, 3, 5), ("never",), ("gpipe", "1f1b")))
ORDERED_SPREAD = [("mlp", 4, "interleaved", "always"), ("gpt", 4, "zbv", "never")]  # on 2 ranks


def _drop_tags(log: dict[tuple[str, int, int], list[int]],
               carriers: set[tuple[int, int, tuple[int, ...]]]) -> None:
    """Make this rank's point-to-point messages match by order alone, as NCCL's do (every tag
    becomes 0), and log each one: its bytes by (op, src, dst), the ranks of its group."""
    isend, irecv, me = dist.isend, dist.irecv, dist.get_rank()

    def note(op: str, src: int, dst: int, tensor: torch.Tensor, group: Any) -> None:
        log.setdefault((op, src, dst), []).append(tensor.numel() * tensor.element_size())
        carriers.add((src, dst, tuple(dist.get_process_group_ranks(group))))

    def send(tensor: torch.Tensor, dst: int, group: Any = None, tag: int = 0) -> Any:
        note("send", me, dst, tensor, group)
        return isend(tensor, dst, group=group, tag=0)

    def recv(tensor: torch.Tensor, src: int, group: Any = None, tag: int = 0) -> Any:
        note("recv", src, me, tensor, group)
        return irecv(tensor, src, group=group, tag=0)

    dist.isend, dist.irecv = send, recv  # type: ignore[assignment]


def _ordered_rank(stages: int, transport: str) -> dict[Any, Any]:
    log: dict[tuple[str, int, int], list[int]] = {}
    carriers: set[tuple[int, int, tuple[int, ...]]] = set()
    _drop_tags(log, carriers)
    results: dict[Any, Any] = {}
    for name in MODELS:
        for config in ORDERED_CONFIGS:
            results[name, config] = _train(name, stages, config, None, samples=ORDERED_B,
                                           transport=transport)
    results["log"] = {key: list(sizes) for key, sizes in log.items()}
    results["carriers"] = set(carriers)
    for name, big_k, schedule, recompute in ORDERED_SPREAD if stages == 2 else ():
        plan = spread_plan(name, big_k, schedule, recompute)  # several pair groups per two ranks
        results[name, schedule] = _train(name, big_k, (0, "", ""), None, samples=SPREAD_B,
                                         transport=transport, plan=plan)
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stages", [2, 3])
def test_ordered_transport_is_transparent_when_messages_match_by_order_alone(
        stages: int) -> None:
    ranks = spawn_local(_ordered_rank, stages, (stages, "ordered"), timeout_s=60,
                        deadline_s=240)
    for name in MODELS:
        oracle = _oracle(name, ORDERED_B)
        for config in ORDERED_CONFIGS:
            rows = [ranks[r][name, config] for r in range(stages)]
            assert not any(r["posted_early"] for r in rows)  # each receive posted when needed
            check_transparent(rows, oracle, f"ordered {name} K={stages} M, recompute, "
                                            f"schedule = {config}")
    # each direction of each neighbouring pair has its own group, of exactly that pair ...
    pairs = [(k, k + 1) for k in range(stages - 1)] + [(k + 1, k) for k in range(stages - 1)]
    carriers = set().union(*(r["carriers"] for r in ranks))
    assert carriers == {(s, d, tuple(sorted((s, d)))) for s, d in pairs}
    # ... and on it the receives match the sends one by one, in order and byte for byte (NCCL
    # needs the exact size; gloo would accept a smaller message)
    logs = {key: sizes for r in ranks for key, sizes in r["log"].items()}
    for src, dst in pairs:
        sent = logs[("send", src, dst)]
        assert len(sent) > 0 and sent == logs[("recv", src, dst)], (src, dst)
    for name, big_k, schedule, recompute in ORDERED_SPREAD if stages == 2 else ():
        oracle = _oracle(name, SPREAD_B)
        last = spread_plan(name, big_k, schedule, recompute).build_schedule().rank_of[-1]
        check_transparent([r[name, schedule] for r in ranks], oracle,
                          f"ordered {name} K={big_k} {schedule} {recompute}", last=last)


@pytest.mark.timeout(120)
def test_dropping_the_tags_breaks_the_posted_transport() -> None:
    # the control: the posted transport relies on tags, so with them dropped it must fail;
    # the test above would therefore catch an ordered transport that relied on them
    with pytest.raises(RankFailure):
        spawn_local(_ordered_rank, 2, (2, "posted"), timeout_s=10, grace_s=3, deadline_s=60)


def test_header_round_trips_shapes_and_dtypes() -> None:
    packet = Packet((torch.zeros(3, 4, 5), torch.zeros(3, dtype=torch.int64),
                     torch.zeros(3, 2, dtype=torch.bool)), True)
    is_tuple, specs = decode_header(encode_header(packet))
    assert is_tuple and specs == [(torch.float32, [3, 4, 5]), (torch.int64, [3]),
                                  (torch.bool, [3, 2])]
    specs = [(t.dtype, list(t.shape)) for t in packet.tensors]
    filled = (torch.randn(3, 4, 5), torch.arange(3), torch.tensor([[True, False]] * 3))
    assert all(torch.equal(a, b) for a, b in zip(unpack(pack(filled), specs), filled,
                                                 strict=True))
    with pytest.raises(ValueError, match="does not fit"):
        encode_header(Packet(tuple(torch.zeros([1] * 8) for _ in range(8)), True))


# -- faults: a rank that raises, is killed or hangs ends every rank, with a clear error ---------

class Fault(nn.Module):
    """Identity on most ranks; on the faulty stage, at its second forward call, raise, kill the
    process or hang."""

    def __init__(self, how: str, stage: int) -> None:
        super().__init__()
        self.how, self.stage, self.calls = how, stage, 0
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if dist.get_rank() == self.stage and self.calls == 2:
            if self.how == "raise":
                raise RuntimeError("boom in layer")
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return x * self.w


def _fault_rank(how: str, stages: int, faulty: int, timeout_s: float) -> None:
    plan = manual_plan(list(range(stages + 1)), 2, 4, "1f1b", "never")
    runner = DistributedRunner(lambda i: Fault(how, faulty), plan, timeout_s=timeout_s)
    x = torch.randn(4, 2)
    for _ in range(3):
        runner.train_step(x, x, nn.functional.mse_loss)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("how", "stages", "expect"), [
    ("raise", 3, "rank 1 raised RuntimeError: boom in layer"),
    ("kill", 2, "rank 1 was killed by signal SIGKILL"),
    ("hang", 2, "rank 1 was still running after the grace period and was killed"),
])
def test_a_failing_rank_ends_every_rank(how: str, stages: int, expect: str) -> None:
    # only a hang needs the timeout; elsewhere a long one shows that nothing waits for it
    timeout_s = 3.0 if how == "hang" else 50.0
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn_local(_fault_rank, stages, (how, stages, 1, timeout_s), grace_s=2.0,
                    deadline_s=90)
    assert time.monotonic() - start < 60
    err = info.value
    assert expect in str(err)
    others = [o for r, o in enumerate(err.outcomes) if r != 1]
    assert others and all(f"raised {PeerError.__module__}.PeerError" in o for o in others), \
        err.outcomes
    assert all("stage 1 (rank 1)" in o for o in others), err.outcomes


def test_runner_needs_an_initialised_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedRunner(em.mlp_layer, manual_plan([0, 7], 1, B))
