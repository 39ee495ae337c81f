"""Data-parallel replicas of the pipeline against plain training on the global batch (the oracle).

One group of 4 local gloo ranks runs every K=2, D=2 case (two pipelines of two ranks, in the
default layout and in an interleaved one, with plain and sharded optimizers; and a traced model
whose first and last layers share a weight, so each replica all-reduces its tied copies across
its pipeline ranks as well), one group of 2 the K=1, D=2 and K=2, D=1 cases; the test process
trains the plain model on the whole batch and compares the loss, every gradient of the first
step and the weights after the last.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from executor.distributed.replicas import GradReducer
from executor.distributed.runner import DistributedRunner
from executor.distributed.spawn import RankFailure, spawn_local
from executor.distributed.transport import PeerError
from executor.runtime.pipeline import manual_plan
from partitioner.formats.plan import Plan
from tests import toy_models as em

B = 8
MODELS: dict[str, tuple[Any, int, Any, Any]] = {
    "mlp": (em.mlp_layer, em.MLP_LAYERS, em.mlp_batch, nn.functional.mse_loss),
    "gpt": (em.gpt_layer, em.GPT_LAYERS, em.gpt_batch, em.lm_loss),
}
OPTIMIZERS = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
              "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2)}


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration: model, K stages, D replicas, M, schedule, optimizer, ZeRO-1 or not,
    optimizer steps, the layout (None: default), V stages per rank and the transport."""

    model: str
    k: int
    d: int
    m: int
    schedule: str
    optimizer: str
    shard: bool
    steps: int
    layout: tuple[tuple[int, ...], ...] | None = None
    per_rank: int = 1
    transport: str = "auto"

    def plan(self) -> Plan:
        layers = MODELS[self.model][1]
        cuts = [round(k * layers / self.k) for k in range(self.k + 1)]
        plan = manual_plan(cuts, self.m, B, self.schedule, "never",
                           stages_per_rank=self.per_rank if self.per_rank > 1 else None)
        return dataclasses.replace(plan, replicas=self.d, layout=self.layout,
                                   shard_optimizer=self.shard)


WIDE = [  # on 4 ranks
    Case("mlp", 2, 2, 2, "gpipe", "sgd", False, 3),
    Case("mlp", 2, 2, 3, "1f1b", "adam", True, 3),  # shares of 4 in 2, 1, 1: weights b_i / B
    # SGD: the attention's key bias has a zero gradient in exact arithmetic, and Adam would
    # turn its rounding noise (different summation orders) into whole steps
    Case("gpt", 2, 2, 2, "1f1b", "sgd", True, 2, layout=((0, 2), (1, 3))),
    Case("mlp", 2, 2, 2, "zb-h1", "sgd", True, 2),  # split backward: the last action is a W
    Case("gpt", 2, 2, 2, "1f1b", "sgd", False, 1, transport="ordered"),  # NCCL's way, on gloo
    Case("mlp", 4, 2, 2, "interleaved", "adam", False, 2, per_rank=2),
]
NARROW = [  # on 2 ranks
    Case("mlp", 1, 2, 2, "gpipe", "adam", True, 3),
    Case("gpt", 1, 2, 1, "gpipe", "sgd", False, 2),
    Case("mlp", 2, 1, 2, "1f1b", "adam", True, 3),  # one replica: sharding is moot
]


def _rank(cases: list[Case]) -> list[dict[str, Any]]:
    out = []
    for case in cases:
        factory, layers, batch, loss_fn = MODELS[case.model]
        runner = DistributedRunner(factory, case.plan(), num_layers=layers,
                                   transport=case.transport)  # type: ignore[arg-type]
        opt = runner.make_optimizer(OPTIMIZERS[case.optimizer])
        x, y = batch(B)
        got: dict[str, Any] = {"losses": [], "replica": runner.replica, "rank": runner.rank}
        for step in range(case.steps):
            if opt is not None:
                opt.zero_grad()
            result = runner.train_step(x, y, loss_fn, timeline=step == case.steps - 1)
            got["timeline"] = None if result.timeline is None else sum(
                e.action.kind == "F" for e in result.timeline.events)
            got["losses"].append(None if result.loss is None else float(result.loss))
            if step == 0:
                got["grads"] = {n: p.grad.clone() for n, p in runner.module.named_parameters()
                                if p.grad is not None}
            if opt is not None:
                opt.step()
        got["params"] = {n: p.detach().clone() for n, p in runner.module.named_parameters()}
        got["sharded"] = type(opt).__name__ == "ZeroRedundancyOptimizer"
        out.append(got)
    return out


def _plain(case: Case) -> dict[str, Any]:
    factory, layers, batch, loss_fn = MODELS[case.model]
    model = nn.Sequential(*(factory(i) for i in range(layers)))
    opt = OPTIMIZERS[case.optimizer](list(model.parameters()))
    x, y = batch(B)
    want: dict[str, Any] = {"losses": []}
    for step in range(case.steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        want["losses"].append(float(loss.detach()))
        if step == 0:
            want["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    want["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return want


def _problems(case: Case, ranks: list[dict[str, Any]]) -> list[str]:
    want = _plain(case)
    found = []
    for rank, got in enumerate(ranks):
        losses = got["losses"]
        if losses[0] is not None and not all(
                abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, want["losses"], strict=True)):
            found.append(f"rank {rank}: losses {losses} != {want['losses']}")
        for what in ("grads", "params"):
            for name, value in got[what].items():
                if not torch.allclose(value, want[what][name], rtol=1e-5, atol=1e-6):
                    err = (value - want[what][name]).abs().max().item()
                    found.append(f"rank {rank}: {what} {name} off by {err:.2e}")
        if (got["timeline"] is not None) != (got["rank"] == 0) or got["timeline"] not in (
                None, case.k * case.m):  # each replica's rank 0 gathers its pipeline's actions
            found.append(f"rank {rank}: a timeline of {got['timeline']} forwards")
        if got["sharded"] != (case.shard and case.d > 1):
            found.append(f"rank {rank}: sharded={got['sharded']}")
    # every parameter on some rank of each replica; the last stage's ranks report the loss
    for d in range(case.d):
        held = {n for got in ranks if got["replica"] == d for n in got["params"]}
        if held != set(want["params"]):
            found.append(f"replica {d} holds {sorted(held)}")
        if not any(got["losses"][0] is not None for got in ranks if got["replica"] == d):
            found.append(f"replica {d}: no rank reports the loss")
    return [f"{case}: {p}" for p in found]




class Fault(nn.Module):
    """x * w; on global rank ``faulty``, at its second forward, raise."""

    def __init__(self, faulty: int) -> None:
        super().__init__()
        self.faulty, self.calls = faulty, 0
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if dist.get_rank() == self.faulty and self.calls == 2:
            raise RuntimeError("boom in a replica")
        return x * self.w


def _fault_rank(faulty: int) -> None:
    plan = dataclasses.replace(manual_plan([0, 1, 2], 2, 8, "1f1b", "never"), replicas=2)
    runner = DistributedRunner(lambda i: Fault(faulty), plan, timeout_s=50)
    x = torch.randn(8, 2)
    for _ in range(3):
        runner.train_step(x, x, nn.functional.mse_loss)


@pytest.mark.timeout(120)
def test_a_failing_rank_of_one_replica_ends_every_rank() -> None:
    # rank 3 (replica 1, pipeline rank 1) raises; its pipeline peer sees its connection close,
    # and the other replica's ranks see their copies leave the gradients' all-reduce
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn_local(_fault_rank, 4, (3,), timeout_s=50, grace_s=5.0, deadline_s=90)
    assert time.monotonic() - start < 60
    err = info.value
    assert "rank 3 raised RuntimeError: boom in a replica" in str(err)
    assert all(f"raised {PeerError.__module__}.PeerError" in o
               for r, o in enumerate(err.outcomes) if r != 3), err.outcomes


def _errors() -> dict[str, str]:
    found = {}
    plan = dataclasses.replace(manual_plan([0, 3, 7], 2, B), replicas=2)
    cases = {
        "world": lambda: DistributedRunner(em.mlp_layer, dataclasses.replace(plan, replicas=3,
                                                                             global_batch=12)),
        "group": lambda: DistributedRunner(em.mlp_layer, plan, group=dist.group.WORLD),
        "batch": lambda: DistributedRunner(em.mlp_layer, plan).train_step(
            *em.mlp_batch(6), nn.functional.mse_loss),
    }
    for name, make in cases.items():
        try:
            make()
        except ValueError as exc:
            found[name] = str(exc)
    return found


@pytest.mark.timeout(180)
def test_bad_replica_setups_say_what_to_do(wide: list[dict[str, Any]]) -> None:
    found = wide[0]["errors"]
    assert "R=2 pipeline ranks x D=3 replicas = 6" in found["world"]
    assert "leave group=None" in found["group"]
    assert "hold 6 samples" in found["batch"] and "B=8" in found["batch"]


class TiedLM(nn.Module):
    """Token ids (b, T) -> logits (b, T, 16); the head's weight is the embedding's."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            self.emb, self.lin = nn.Embedding(16, 8), nn.Linear(8, 8)
            self.mid, self.head = nn.Linear(8, 8), nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(torch.tanh(self.lin(self.emb(ids))))))


def _tied_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(16, (B, 5), generator=g), torch.randint(16, (B, 5), generator=g)


TIED_STEPS = 3


def _tied_rank() -> dict[str, Any]:
    """TiedLM's 6 traced layers as K=2 stages (the tie spans them) x D=2 replicas, 3 SGD steps."""
    x, y = _tied_batch()
    plan = manual_plan(None, 2, B, "1f1b", nodes=[[0, 1, 2], [3, 4, 5]])
    runner = DistributedRunner(TiedLM(), dataclasses.replace(plan, replicas=2), sample=x[:2])
    opt = runner.make_optimizer(OPTIMIZERS["sgd"])
    losses = []
    for _ in range(TIED_STEPS):
        opt.zero_grad()
        losses.append(runner.train_step(x, y, em.lm_loss).loss)
        opt.step()
    return {"losses": [None if v is None else float(v) for v in losses],
            "params": {n: p.detach().clone() for n, p in runner.named_parameters().items()}}


def _wide_rank(cases: list[Case]) -> dict[str, Any]:
    return {"errors": _errors(), "cases": _rank(cases), "tied": _tied_rank()}


@pytest.fixture(scope="module")
def wide() -> list[dict[str, Any]]:
    """What each of 4 ranks returns: the bad setups' errors, then the WIDE cases."""
    return spawn_local(_wide_rank, 4, (WIDE,), timeout_s=60, deadline_s=170)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [4, 2], ids=["K2xD2", "K1xD2+K2xD1"])
def test_replicas_train_as_plain_training_on_the_global_batch(
        world: int, request: pytest.FixtureRequest) -> None:
    if world == 4:
        cases, results = WIDE, [r["cases"] for r in request.getfixturevalue("wide")]
    else:
        cases = NARROW
        results = spawn_local(_rank, world, (cases,), timeout_s=60, deadline_s=170)
    problems = [p for c, case in enumerate(cases) for p in _problems(case, [r[c] for r in results])]
    assert not problems, "\n".join(problems[:20])


@pytest.mark.timeout(180)
def test_tied_copies_sum_over_the_pipeline_and_the_replicas(wide: list[dict[str, Any]]) -> None:
    model, (x, y) = TiedLM(), _tied_batch()
    opt = OPTIMIZERS["sgd"](list(model.parameters()))
    want = []
    for _ in range(TIED_STEPS):
        opt.zero_grad()
        loss = em.lm_loss(model(x), y)
        loss.backward()
        opt.step()
        want.append(float(loss.detach()))
    tied = [r["tied"] for r in wide]
    for rank in (1, 3):  # the last stage of each replica
        got = tied[rank]["losses"]
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want, strict=True)), got
    plain = dict(model.named_parameters())  # the tie once, as emb.weight
    for rank, got in enumerate(tied):
        for name, value in got["params"].items():
            ref = plain.get(name, model.emb.weight)  # head.weight: the tie's other name
            assert torch.allclose(value, ref, rtol=1e-5, atol=1e-6), (rank, name)
    # a copy of the tie on every rank (stage 0: emb.weight, stage 1: head.weight), all equal
    copies = [got["params"].get("emb.weight", got["params"].get("head.weight")) for got in tied]
    assert all(c is not None and torch.equal(c, copies[0]) for c in copies)


def test_buckets_hold_one_dtype_and_stay_near_their_size() -> None:
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 10, 100, 5)]
    params.append(nn.Parameter(torch.zeros(3, dtype=torch.float64)))
    reducer = GradReducer(params, None, [0], bucket_bytes=80)
    sizes = [[p.numel() for p in bucket] for bucket in reducer.buckets]
    assert sizes == [[10, 10], [100], [5], [3]]
    # one process, no group: the sum of one copy is itself, in place or through a bucket,
    # and a gradient that is not contiguous comes back in its own layout
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for p in params:
            p.grad = torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape)
        wide = nn.Parameter(torch.zeros(4, 3))
        wide.grad = torch.arange(12.0).reshape(3, 4).t()  # a transposed view
        for reducer in (GradReducer(params, None, [0], bucket_bytes=80),
                        GradReducer([wide], None, [0])):  # alone in its bucket
            reducer.start()
            reducer.finish()
        assert all(torch.equal(p.grad, torch.arange(p.numel(), dtype=p.dtype))
                   for p in params)
        assert torch.equal(wide.grad, torch.arange(12.0).reshape(3, 4).t())
    finally:
        dist.destroy_process_group()


def test_attached_gradients_are_summed_in_their_bucket_without_copies() -> None:
    """After ``attach`` a bucket's gradients are views into its buffer: backward accumulates
    there and the sum is taken in place (no packing, no copies back); a gradient the user put
    in place of a view is packed and summed as before."""
    layer = nn.Linear(4, 3)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        reducer = GradReducer(list(layer.parameters()), None, [0])
        for step in range(2):
            layer.zero_grad()  # set_to_none, as optimizers do
            reducer.attach()
            weight, bias = layer.weight.grad, layer.bias.grad
            assert weight is not None and bias is not None
            assert bias.data_ptr() == weight.data_ptr() + 12 * 4  # one buffer
            for _ in range(2):  # two micro-batches accumulate into it
                layer(torch.ones(2, 4)).sum().backward()
            reducer.start()
            assert reducer._pending[0][3] is False  # nothing packed
            reducer.finish()
            assert layer.weight.grad is weight and torch.equal(weight, torch.full((3, 4), 4.0))
            assert torch.equal(bias, torch.full((3,), 4.0)), step
        reducer.attach()
        layer.bias.grad = torch.full((3,), 7.0)  # the user's own tensor, after attach
        reducer.start()
        assert reducer._pending[0][3] is True
        reducer.finish()
        assert torch.equal(layer.bias.grad, torch.full((3,), 7.0))
        assert torch.equal(layer.weight.grad, torch.full((3, 4), 4.0))  # kept, attached
    finally:
        dist.destroy_process_group()
