"""The distributed runner: one rank per schedule row, tensors over torch.distributed point-to-point.

    runner = DistributedRunner(layer_factory, "plan.json")   # after init_process_group
    result = runner.train_step(inputs, targets, loss_fn, timeline=True)
    optimizer.step()   # an optimizer over runner.parameters(): this rank's layers

The plan's schedule (``plan.build_schedule()``: any generator's, or a synthesised one) has one
row per rank: R = K / V ranks, rank r running the stages its placement puts there (V > 1:
interleaved, or the V shape of zbv) and building only their layers (from the model, or from a
factory), one interpreter per stage, the row's actions in order. Messages between two stages
of one rank stay in the process (``executor.distributed.routing``). Sends to other ranks are
asynchronous (``isend``, waited for at the end of the step); receives name the (kind, source
stage, destination stage, micro-batch) they want by tag, so no order between a pair of ranks
is assumed and no schedule that can run deadlocks. With gloo the pipeline's own group carries
everything. NCCL ignores tags and matches by order, so there each direction of each pair of
stages on different ranks gets its own group, one ordered stream each, whose sends and receives
both follow the two stages' micro-batch order (checked against the schedule), and each receive
is posted when needed (``transport="ordered"``, the default with NCCL). That path has not run on
NCCL (no GPU was at hand), but the tests run it on gloo with the tags dropped, so that messages
match by order alone as on NCCL.

Data-parallel replicas (a plan with D > 1, on a world of R x D ranks): each rank takes its
replica d and row r from the plan's layout, runs replica d's share of the global batch with
each micro-batch's loss weighted by its size over B, and after its last backward of the step
sums its stages' gradients over their D copies; ``make_optimizer`` makes the optimizer, ZeRO-1
over those copies when the plan shards it. See ``executor.distributed.replicas``.

Messages and the posting of receives ahead: see ``executor.distributed.transport``.

Failures: a peer that raises and exits, or is killed, closes its connections, and a rank waiting
on it gets an error at once; one that hangs is caught by the process group's timeout
(``timeout_s``). Either way the waiting rank raises PeerError naming the action, the peer and the
cause; its process exits in turn (spawn_local and torchrun end it), so every rank ends.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist

from executor.distributed.graphrank import graph_rank, sync_ties
from executor.distributed.replicas import GradReducer, for_plan, sharded, share_of, sum_loss
from executor.distributed.routing import RankTransport, chain_pairs, channels, order_problems
from executor.distributed.transport import DistTransport
from executor.graphs.batches import batch_size_of, join_tree, move_tree, split_tree
from executor.graphs.blocks import Leaf
from executor.graphs.pipeline import split_step
from executor.runtime.allocator import keep_freed_memory as keep_memory
from executor.runtime.batch import Batch, gather
from executor.runtime.batchnorm import DeferredBatchNorm
from executor.runtime.devices import check_device
from executor.runtime.interpreter import Interpreter, LossFn, StageResult, StepData
from executor.runtime.local import FORWARD_KINDS, LocalTransport, runnable_schedule, split_of
from executor.runtime.pipeline import as_plan, executable_ranges
from executor.runtime.recorder import Recorder
from executor.runtime.stage import LayerSource, Stage, build_layers
from executor.runtime.ties import check_ties, tied_parameters
from partitioner.cost.model import split_microbatches
from partitioner.formats.plan import Plan, PlanError
from partitioner.formats.timeline import Event, Timeline

__all__ = ["DistributedRunner", "StepResult"]

BACKWARD_KINDS = ("B", "I", "W")  # the actions that write gradients


@dataclass
class StepResult:
    """One rank's view of a step: the batch's loss on the rank of the last stage (else None),
    the measured timeline of all stages on rank 0 when asked (else None), the peak bytes of
    activations each of this rank's stages held (``executor.runtime.memory``; the timeline's
    ``stage_activation_peak_bytes`` has every stage's) and, on CUDA, the device's
    ``max_memory_allocated`` during the step (None elsewhere)."""

    loss: torch.Tensor | None
    timeline: Timeline | None
    activation_peak_bytes: dict[int, int] = field(default_factory=dict)
    allocated_peak_bytes: int | None = None


class _Memory(NamedTuple):
    """A rank's memory figures of its last step (``StepResult``)."""

    activations: dict[int, int]  # per stage of the rank, its peak activation bytes
    allocated: int | None  # CUDA: max_memory_allocated during the step


_TRANSPORTS = ("auto", "ordered", "posted")


class DistributedRunner:
    """This rank's stages of ``plan``, built from ``layers`` (an ``nn.Sequential`` or a factory,
    see ``stage.build_layers``; or a traced model, ``executor.graphs``). Call after
    ``init_process_group``, on every rank of ``group`` (default: the whole world): its r-th rank
    runs row r of the plan's schedule. ``device`` defaults to the plan's device for this rank's
    stages; ``keep_freed_memory`` sets this process's allocator to keep freed memory for the
    next step (``executor.runtime.allocator``, process-wide). ``transport``: ``"posted"``
    (messages matched by tag on one group, receives posted ahead: gloo's), ``"ordered"`` (one
    group per direction of each stage pair across ranks, each receive posted when needed:
    NCCL's, which matches by order; the pipeline must span the world) or ``"auto"`` (ordered
    with NCCL, posted otherwise); see the module docstring.

    ``rank``: this rank's row r; ``stage_indices``: the stages it runs, ``stages`` them
    (``stage``: the one stage of a rank that runs one)."""

    def __init__(self, layers: LayerSource | torch.nn.Module,
                 plan: Plan | Mapping[str, object] | str | Path, *,
                 num_layers: int | None = None, device: str | torch.device | None = None,
                 deferred_batchnorm: bool = False, timeout_s: float = 60.0,
                 group: Any = None, keep_freed_memory: bool = False,
                 transport: Literal["auto", "ordered", "posted"] = "auto",
                 sample: Any = None, weights: Mapping[str, torch.Tensor] | str | Path | None = None,
                 leaves: Sequence[Leaf] | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call "
                               "init_process_group first (torchrun + partition-model run "
                               "does), or use executor.distributed.spawn.spawn_local for local CPU ranks")
        self.plan = as_plan(plan)
        big_k = self.plan.num_stages
        self.schedule = runnable_schedule(self.plan.build_schedule(), big_k,
                                          self.plan.microbatches)
        big_r = self.schedule.ranks
        self.replicas = for_plan(self.plan, big_r, group, timeout_s)  # None: one replica
        if self.replicas is not None:  # this replica's pipeline, on its own group
            group = self.replicas.pipeline
            self.ranks = list(self.replicas.layout[self.replicas.d])
        else:
            self.ranks = dist.get_process_group_ranks(group) if group is not None else list(
                range(dist.get_world_size()))
        self.group = group
        world = len(self.ranks)
        if world != big_r:
            per = f", V={big_k // big_r} per rank" if big_r != big_k else ""
            raise ValueError(f"the world has {world} ranks but the plan has K={big_k} stages "
                             f"on R={big_r} ranks{per}; start one rank per row of its schedule "
                             f"(torchrun --nproc-per-node {big_r})")
        if dist.get_rank() not in self.ranks:
            raise ValueError(f"rank {dist.get_rank()} is not in the group {self.ranks}; only "
                             f"its ranks make a runner")
        self.rank = self.ranks.index(dist.get_rank())  # this rank's row r of the schedule
        rank_of = self.schedule.rank_of
        self.stage_indices = [k for k in range(big_k) if rank_of[k] == self.rank]
        self.stage_ranks = [self.ranks[r] for r in rank_of]  # the global rank of each stage
        self.graph_mode = isinstance(layers, torch.nn.Module) and not isinstance(
            layers, torch.nn.Sequential)  # a Sequential (or a layer factory) stays a chain
        ranges: list[tuple[int, int]] = []
        if not self.graph_mode:
            if num_layers is None and isinstance(layers, torch.nn.Sequential):
                num_layers = len(layers)
            try:
                ranges = (executable_ranges(self.plan, num_layers) if num_layers is not None
                          else self.plan.layer_ranges())
                if isinstance(layers, torch.nn.Sequential):
                    check_ties(tied_parameters(layers), ranges)
            except PlanError as exc:
                raise PlanError(f"rank {dist.get_rank()}: {exc}") from None
        elif deferred_batchnorm:
            raise ValueError("deferred_batchnorm works with nn.Sequential chains only")
        dev = self._device(device)
        backend = str(dist.get_backend(group))
        ordered = self._ordered(transport, backend, dev)
        if keep_freed_memory:
            keep_memory()
        self.ties: list[tuple[torch.nn.Parameter, Any]] = []
        self.layer_graph = None
        pairs = chain_pairs(big_k)
        if isinstance(layers, torch.nn.Module) and self.graph_mode:
            try:
                stages, pairs, self.ties, self.layer_graph = graph_rank(
                    layers, self.plan, self.stage_indices, sample, torch.device(dev),
                    self.stage_ranks, weights=weights, leaves=leaves, timeout_s=timeout_s,
                    backend=backend, copies=self._replica_stage_ranks())
            except PlanError as exc:
                raise PlanError(f"rank {dist.get_rank()}: {exc}") from None
            self.stages: list[Any] = list(stages)
        else:
            self.stages = [Stage(k, build_layers(layers, *ranges[k]), dev,
                                 recompute=self.plan.recomputes(k))
                           for k in self.stage_indices]
        self.actions = self.schedule.actions[self.rank]
        self.transport = self._transport(pairs, group, timeout_s, backend, ordered)
        self.interpreters = [
            Interpreter(s, big_k, self.transport, Recorder(s.device),
                        DeferredBatchNorm(s.module) if deferred_batchnorm else None,
                        split=split_of(self.schedule, s.index)) for s in self.stages]
        self._by_stage = {s.index: interp for s, interp in zip(self.stages, self.interpreters,
                                                               strict=True)}
        self.reducer = None if self.replicas is None else GradReducer(
            self.parameters(), self.replicas.replica, self.replicas.copies(self.rank))
        self._last_backward = max((j for j, a in enumerate(self.actions)
                                   if a.kind in BACKWARD_KINDS), default=-1)
        self.memory = _Memory({}, None)  # the last step's (StepResult)

    def _replica_stage_ranks(self) -> list[list[int]]:
        """The global rank of each stage, in every replica (one list per replica)."""
        if self.replicas is None:
            return [self.stage_ranks]
        return [[ranks[r] for r in self.schedule.rank_of] for ranks in self.replicas.layout]

    @property
    def replica(self) -> int:
        """d: the replica this rank belongs to (0 with one replica)."""
        return 0 if self.replicas is None else self.replicas.d

    def make_optimizer(self, factory: Callable[[list[torch.nn.Parameter]], Any],
                       shard: bool | None = None) -> Any:
        """``factory(self.parameters())``, or with ``shard`` (default: the plan's
        ``shard_optimizer``) and D > 1 replicas, that optimizer as a ZeRO-1 one over the
        stage's copies (``replicas.sharded``). None for a rank without parameters."""
        params = self.parameters()
        if not params:
            return None
        optimizer = factory(params)
        shard = self.plan.shard_optimizer if shard is None else shard
        if shard and self.replicas is not None:
            return sharded(optimizer, self.replicas.replica)
        return optimizer

    def _device(self, device: str | torch.device | None) -> str | torch.device:
        """The rank's device: the one given, or the plan's for its stages (one for all)."""
        if device is None:
            planned = sorted({self.plan.stages[k].device for k in self.stage_indices})
            if len(planned) > 1:
                raise ValueError(f"rank {dist.get_rank()} runs stages {self.stage_indices}, "
                                 f"which the plan puts on devices {planned}; a rank has one "
                                 f"device: give device=, or a plan with one device per rank")
            device = planned[0]
        problem = check_device(device)
        if problem:
            raise ValueError(f"rank {dist.get_rank()} (stages {self.stage_indices}): {problem}")
        return device

    def _ordered(self, transport: str, backend: str, dev: str | torch.device) -> bool:
        """Whether messages go matched by order (NCCL's way), after checking the choice."""
        if backend == "nccl" and torch.device(dev).type != "cuda":
            raise ValueError(f"rank {dist.get_rank()}: the NCCL backend needs a CUDA device, got "
                             f"{dev!r}; use gloo on CPU")
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport={transport!r} is not one of {_TRANSPORTS}")
        if transport == "posted" and backend == "nccl":
            raise ValueError("transport='posted' matches messages by tag, which NCCL ignores; "
                             "use 'ordered' (or 'auto') with NCCL")
        ordered = transport == "ordered" or (transport == "auto" and backend == "nccl")
        if ordered and self.group is not None and self.replicas is None:
            raise ValueError(f"with {'NCCL' if backend == 'nccl' else 'the ordered transport'} "
                             f"the pipeline must span the whole world (group=None): its "
                             f"per-direction groups are made by every rank")
        return ordered

    def _transport(self, pairs: Sequence[tuple[int, int]], group: Any, timeout_s: float,
                   backend: str, ordered: bool) -> RankTransport:
        """The mailbox between this rank's stages and a DistTransport for each of them."""
        rank_of = self.schedule.rank_of
        if ordered and self.replicas is not None:  # every rank makes every replica's groups
            every = [channels(ranks, pairs, None, timeout_s, backend, True)
                     for ranks in self._replica_stage_ranks()]
            wires = every[self.replicas.d]
        else:
            wires = channels(self.stage_ranks, pairs, group, timeout_s, backend, ordered)
        if ordered and (problems := order_problems(self.schedule, wires)):
            raise ValueError(f"schedule {self.schedule.name!r} cannot run with messages matched "
                             f"by order (NCCL): " + "; ".join(problems) + "; use a schedule "
                             "whose stages run their micro-batches in one order, or gloo")
        device = self.stages[0].device
        remote = {}
        for s in self.stages:
            sources = list(s.sources) if self.graph_mode else [s.index - 1] if s.index else []
            remote[s.index] = DistTransport(
                s.index, self.stage_ranks, device, wires, timeout_s, post_early=not ordered,
                sources=[k for k in sources if rank_of[k] != self.rank])
        mailbox = LocalTransport([device] * self.plan.num_stages)
        return RankTransport(remote, mailbox, self.stage_indices)

    @property
    def stage(self) -> Any:
        """The stage of a rank that runs one (``stages``: all of them)."""
        if len(self.stages) != 1:
            raise AttributeError(f"rank {self.rank} runs stages {self.stage_indices}: use "
                                 f"runner.stages")
        return self.stages[0]

    @property
    def index(self) -> int:
        """This rank's row r of the schedule (with one stage per rank: its stage k)."""
        return self.rank

    @property
    def module(self) -> torch.nn.Module:
        """This rank's layers (a chain's children are named by their global index, also when
        the rank runs several stages)."""
        if len(self.stages) == 1:
            module: torch.nn.Module = self.stages[0].module
            return module
        if self.graph_mode:
            return torch.nn.ModuleList(s.module for s in self.stages)
        return torch.nn.ModuleDict({name: layer for s in self.stages
                                    for name, layer in s.module.named_children()})

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """This rank's parameters by the model's own names (one entry per parameter)."""
        if not self.graph_mode:
            return dict(self.module.named_parameters())
        out: dict[str, torch.nn.Parameter] = {}
        for s in self.stages:
            for name, p in s.named_parameters().items():
                if all(p is not q for q in out.values()):
                    out.setdefault(name, p)
        return out

    def parameters(self) -> list[torch.nn.Parameter]:
        """This rank's parameters, each once (stages of one rank may share a tied one)."""
        return list({id(p): p for s in self.stages for p in s.parameters()}.values())

    def _step(self, data: StepData, training: bool, timeline: bool
              ) -> tuple[dict[int, StageResult], Timeline | None]:
        recorders = [interp.recorder for interp in self.interpreters]
        if timeline:  # a common clock: every rank starts counting as it leaves the barrier
            dist.barrier(group=self.group)
        cuda = self.stages[0].device if self.stages[0].device.type == "cuda" else None
        if cuda is not None:
            torch.cuda.reset_peak_memory_stats(cuda)
        t0 = time.perf_counter()
        for interp in self.interpreters:
            assert interp.recorder is not None
            interp.recorder.reset(t0)
            interp.begin(data, training)
        self.transport.begin_step(self.plan.microbatches, training)
        reducer = self.reducer if training else None
        if reducer is not None:
            reducer.attach()  # backward accumulates into the buckets: no packing to sum them
        for j, action in enumerate(self.actions):
            if training or action.kind in FORWARD_KINDS:
                self._by_stage[action.stage].run(action)
            if reducer is not None and j == self._last_backward:
                reducer.start()  # the gradients are final here: sum them while sends go out
        self.transport.finish()
        results = {k: interp.end() for k, interp in self._by_stage.items()}
        if reducer is not None:
            if self._last_backward < 0:
                reducer.start()
            reducer.finish()
        if training and self.ties:  # after the replicas' sum: both are sums, in any order
            sync_ties(self.ties)
        last = results.get(self.plan.num_stages - 1)
        if self.replicas is not None and last is not None and last.loss is not None:
            last.loss = sum_loss(last.loss, self.replicas)
        self.memory = _Memory({k: r.peak_activation_bytes for k, r in results.items()},
                              torch.cuda.max_memory_allocated(cuda) if cuda is not None
                              else None)
        events = [e for rec in recorders if rec is not None for e in rec.events()]
        return results, (self._gather_timeline(events, t0, training) if timeline else None)

    def _gather_timeline(self, events: list[Event], t0_s: float,
                         training: bool) -> Timeline | None:
        """Every stage's events on rank 0, on rank 0's clock. Ranks on rank 0's host share
        its monotonic clock (perf_counter), so their events move by the difference of the
        moments each left the barrier; ranks elsewhere count from their own barrier exit.
        The memory figures of every rank come along (``StepResult``)."""
        rows: list[Any] = [None] * len(self.ranks) if self.rank == 0 else []
        dist.gather_object((socket.gethostname(), t0_s, events, self.memory),
                           rows if self.rank == 0 else None, dst=self.ranks[0],
                           group=self.group)
        if self.rank != 0:
            return None
        host0, base = rows[0][0], rows[0][1]
        aligned = []
        peaks = [0] * self.plan.num_stages
        allocated: list[int | None] = []
        for host, t0, row, memory in rows:
            shift = (t0 - base) * 1e3 if host == host0 else 0.0
            aligned += [replace(e, start_ms=e.start_ms + shift, end_ms=e.end_ms + shift)
                        for e in row]
            for k, peak in memory.activations.items():
                peaks[k] = peak
            allocated.append(memory.allocated)
        meta: dict[str, Any] = {"schedule": self.schedule.name,
                                "microbatches": self.plan.microbatches,
                                "runner": "distributed", "training": training}
        if training:
            meta["stage_activation_peak_bytes"] = peaks
        if training and all(a is not None for a in allocated):
            meta["rank_allocated_peak_bytes"] = allocated
        return Timeline(self.plan.num_stages, tuple(aligned), "measured", meta)

    def _data(self, inputs: Any, targets: Any, loss_fn: LossFn | None) -> StepData:
        """The step's micro-batches as this rank's stages take them: the inputs when it runs
        the first stage, the targets when it runs the last."""
        data = self._split(inputs, targets, loss_fn)
        if self.replicas is not None:  # each micro-batch's loss weighs b_i / B, B global
            data.total = self.plan.global_batch
        return data

    def _split(self, inputs: Any, targets: Any, loss_fn: LossFn | None) -> StepData:
        device = self.stages[0].device
        first, last = 0 in self._by_stage, self.plan.num_stages - 1 in self._by_stage
        share = self.replicas, self.plan
        x = move_tree(share_of(inputs, "inputs", *share), device) if first else None
        y = (move_tree(share_of(targets, "targets", *share), device)
             if last and loss_fn is not None else None)
        if x is None and y is None:  # a middle stage: the sizes come with the activations
            return StepData([0] * self.plan.microbatches, None, None, loss_fn)
        if not self.graph_mode:
            return StepData.split(x, y, self.plan.microbatches, loss_fn)
        assert self.layer_graph is not None
        if x is not None:
            return split_step(self.layer_graph, x, y, self.plan.microbatches, loss_fn)
        b = batch_size_of(y, "targets")
        sizes = split_microbatches(b, self.plan.microbatches)
        return StepData(sizes, None, split_tree(y, sizes), loss_fn)

    def _last(self, results: dict[int, StageResult]) -> StageResult | None:
        return results.get(self.plan.num_stages - 1)

    def train_step(self, inputs: Batch | None = None, targets: Batch | None = None,
                   loss_fn: LossFn | None = None, *, timeline: bool = False) -> StepResult:
        """One step of the plan's schedule on this rank. The rank of the first stage needs
        ``inputs``, that of the last ``targets`` and ``loss_fn`` (others may pass them too;
        they are ignored). Gradients accumulate in this rank's layers. With D replicas: the
        global batch (or this replica's share), gradients summed over the replicas and the loss
        the global batch's."""
        results, tl = self._step(self._data(inputs, targets, loss_fn), True, timeline)
        last = self._last(results)
        return StepResult(last.loss if last is not None else None, tl,
                          dict(self.memory.activations), self.memory.allocated)

    def forward(self, inputs: Batch | None = None) -> Batch | None:
        """Forward only, without autograd: the whole batch's outputs on the last stage's
        rank (None elsewhere); with D replicas, each replica's share's."""
        results, _ = self._step(self._data(inputs, None, None), False, False)
        last = self._last(results)
        if last is None or not last.outputs:
            return None
        return join_tree(last.outputs) if self.graph_mode else gather(last.outputs)
