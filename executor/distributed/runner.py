"""The distributed runner: one rank per stage, tensors over torch.distributed point-to-point.

    runner = DistributedRunner(layer_factory, "plan.json")   # after init_process_group
    result = runner.train_step(inputs, targets, loss_fn, timeline=True)
    optimizer.step()   # an optimizer over runner.parameters(): this rank's layers

Rank k runs stage k and builds only layers [start_k, end_k) (from the model, or from a factory).
Sends are asynchronous (``isend``, waited for at the end of the step); receives name the
(kind, micro-batch) they want by tag, so no order between a pair of ranks is assumed and 1F1B
cannot deadlock. With gloo the pipeline's own group carries everything. NCCL ignores tags and
matches by order, so there each direction of each neighbouring pair gets its own group, one
ordered stream each, whose sends and receives both follow micro-batch order in GPipe and 1F1B,
and each receive is posted when needed (``transport="ordered"``, the default with NCCL). That
path has not run on NCCL (no GPU was at hand), but the tests run it on gloo with the tags
dropped, so that messages match by order alone as on NCCL.

Messages and the posting of receives ahead: see ``executor.distributed.transport``.

Failures: a peer that raises and exits, or is killed, closes its connections, and a rank waiting
on it gets an error at once; one that hangs is caught by the process group's timeout
(``timeout_s``). Either way the waiting rank raises PeerError naming the action, the peer and the
cause; its process exits in turn (spawn_local and torchrun end it), so every rank ends.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from executor.distributed.graphrank import graph_rank, sync_ties
from executor.distributed.transport import DistTransport
from executor.graphs.batches import batch_size_of, join_tree, move_tree, split_tree
from executor.graphs.blocks import Leaf
from executor.graphs.pipeline import split_step
from executor.runtime.allocator import keep_freed_memory as keep_memory
from executor.runtime.batch import Batch, gather
from executor.runtime.batchnorm import DeferredBatchNorm
from executor.runtime.devices import check_device
from executor.runtime.interpreter import Interpreter, LossFn, StepData
from executor.runtime.local import FORWARD_KINDS
from executor.runtime.pipeline import as_plan, executable_ranges
from executor.runtime.recorder import Recorder
from executor.runtime.stage import LayerSource, Stage, build_layers
from executor.runtime.ties import check_ties, tied_parameters
from partitioner.cost.model import split_microbatches
from partitioner.formats.plan import Plan, PlanError
from partitioner.formats.timeline import Event, Timeline
from partitioner.schedule.generators import make_schedule
from partitioner.schedule.ir import lower, validate

__all__ = ["DistributedRunner", "StepResult"]


@dataclass
class StepResult:
    """One rank's view of a step: the batch's loss on the last rank (else None), the measured
    timeline of all stages on rank 0 when asked (else None)."""

    loss: torch.Tensor | None
    timeline: Timeline | None


_TRANSPORTS = ("auto", "ordered", "posted")

_GROUPS: dict[tuple[Any, ...], tuple[Any, dict[tuple[int, int], Any]]] = {}


def _channels(ranks: Sequence[int], group: Any, timeout_s: float, backend: str,
              ordered: bool, pairs: Sequence[tuple[int, int]] | None = None
              ) -> dict[tuple[int, int], Any]:
    """The group carrying messages from stage src to stage dst, keyed (src, dst). Matched by
    tag (gloo), the pipeline's own group carries everything. Matched by order (``ordered``:
    NCCL), each direction of each neighbouring pair gets its own group: one ordered stream per
    direction. Those are made once per world (every rank creates them all, in the same order,
    as torch.distributed requires) and reused by later runners."""
    if pairs is None:  # a chain: neighbours only
        pairs = [(k, k + 1) for k in range(len(ranks) - 1)] + [(k + 1, k) for k in
                                                                range(len(ranks) - 1)]
    if not ordered:
        return {pair: group for pair in pairs}
    key: tuple[Any, ...] = (tuple(ranks), *pairs)
    world = dist.group.WORLD
    if key in _GROUPS and _GROUPS[key][0] is world:  # the cache holds on to that world
        return _GROUPS[key][1]
    groups = {(src, dst): dist.new_group(sorted((ranks[src], ranks[dst])),
                                         timeout=timedelta(seconds=timeout_s), backend=backend)
              for src, dst in pairs}
    _GROUPS[key] = (world, groups)
    return groups


class DistributedRunner:
    """This rank's stage of ``plan``, built from ``layers`` (an ``nn.Sequential`` or a factory,
    see ``stage.build_layers``). Call after ``init_process_group``, on every rank of ``group``
    (default: the whole world): its k-th rank runs stage k. ``device`` defaults to the plan's
    device for this stage; ``keep_freed_memory`` sets this process's allocator to keep freed
    memory for the next step (``executor.runtime.allocator``, process-wide). ``transport``:
    ``"posted"`` (messages matched by tag on one group, receives posted ahead: gloo's),
    ``"ordered"`` (one group per direction of each neighbouring pair, each receive posted when
    needed: NCCL's, which matches by order; the pipeline must span the world) or ``"auto"``
    (ordered with NCCL, posted otherwise); see the module docstring."""

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
        self.group = group
        self.ranks = dist.get_process_group_ranks(group) if group is not None else list(
            range(dist.get_world_size()))
        big_k, world = self.plan.num_stages, len(self.ranks)
        if world != big_k:
            raise ValueError(f"the world has {world} ranks but the plan has K={big_k} stages; "
                             f"start one rank per stage (torchrun --nproc-per-node {big_k})")
        if dist.get_rank() not in self.ranks:
            raise ValueError(f"rank {dist.get_rank()} is not in the group {self.ranks}; only "
                             f"its ranks make a runner")
        self.index = self.ranks.index(dist.get_rank())  # this rank's stage k
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
        dev = device if device is not None else self.plan.stages[self.index].device
        problem = check_device(dev)
        if problem:
            raise ValueError(f"rank {dist.get_rank()} (stage {self.index}): {problem}")
        backend = str(dist.get_backend(group))
        if backend == "nccl" and torch.device(dev).type != "cuda":
            raise ValueError(f"rank {dist.get_rank()}: the NCCL backend needs a CUDA device, got "
                             f"{dev!r}; use gloo on CPU")
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport={transport!r} is not one of {_TRANSPORTS}")
        if transport == "posted" and backend == "nccl":
            raise ValueError("transport='posted' matches messages by tag, which NCCL ignores; "
                             "use 'ordered' (or 'auto') with NCCL")
        ordered = transport == "ordered" or (transport == "auto" and backend == "nccl")
        if ordered and group is not None:
            raise ValueError(f"with {'NCCL' if backend == 'nccl' else 'the ordered transport'} "
                             f"the pipeline must span the whole world (group=None): its "
                             f"per-direction groups are made by every rank")
        if keep_freed_memory:
            keep_memory()
        self.ties: list[tuple[torch.nn.Parameter, Any]] = []
        self.layer_graph = None
        pairs = None
        if isinstance(layers, torch.nn.Module) and self.graph_mode:
            try:
                stage, pairs, self.ties, self.layer_graph = graph_rank(
                    layers, self.plan, self.index, sample, torch.device(dev), self.ranks,
                    weights=weights, leaves=leaves, timeout_s=timeout_s, backend=backend)
            except PlanError as exc:
                raise PlanError(f"rank {dist.get_rank()}: {exc}") from None
            self.stage: Any = stage
            sources = list(stage.sources)
        else:
            start, end = ranges[self.index]
            self.stage = Stage(self.index, build_layers(layers, start, end),
                               dev, recompute=self.plan.recomputes(self.index))
            sources = [self.index - 1] if self.index > 0 else []
        self.schedule = validate(lower(make_schedule(self.plan.schedule, big_k,
                                                     self.plan.microbatches)))
        self.actions = self.schedule.actions[self.index]
        self.transport = DistTransport(self.index, self.ranks, self.stage.device,
                                       _channels(self.ranks, group, timeout_s, backend,
                                                 ordered, pairs),
                                       timeout_s, post_early=not ordered, sources=sources)
        self.interpreter = Interpreter(
            self.stage, big_k, self.transport, Recorder(self.stage.device),
            DeferredBatchNorm(self.stage.module) if deferred_batchnorm else None)

    @property
    def module(self) -> torch.nn.Module:
        """This rank's layers (a chain's children are named by their global index)."""
        module: torch.nn.Module = self.stage.module
        return module

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.stage.parameters())

    def _step(self, data: StepData, training: bool, timeline: bool) -> tuple[Any, Timeline | None]:
        recorder = self.interpreter.recorder
        assert recorder is not None
        if timeline:  # a common clock: every rank starts counting as it leaves the barrier
            dist.barrier(group=self.group)
        recorder.reset(time.perf_counter())
        self.interpreter.begin(data, training)
        self.transport.begin_step(self.plan.microbatches, training)
        for action in self.actions:
            if training or action.kind in FORWARD_KINDS:
                self.interpreter.run(action)
        self.transport.finish()
        result = self.interpreter.end()
        if training and self.ties:
            sync_ties(self.ties)
        return result, (self._gather_timeline(recorder.events(), recorder.t0_s, training)
                        if timeline else None)

    def _gather_timeline(self, events: list[Event], t0_s: float,
                         training: bool) -> Timeline | None:
        """Every stage's events on rank 0, on rank 0's clock. Ranks on rank 0's host share
        its monotonic clock (perf_counter), so their events move by the difference of the
        moments each left the barrier; ranks elsewhere count from their own barrier exit."""
        rows: list[Any] = [None] * len(self.ranks) if self.index == 0 else []
        dist.gather_object((socket.gethostname(), t0_s, events),
                           rows if self.index == 0 else None, dst=self.ranks[0],
                           group=self.group)
        if self.index != 0:
            return None
        host0, base = rows[0][0], rows[0][1]
        aligned = []
        for host, t0, row in rows:
            shift = (t0 - base) * 1e3 if host == host0 else 0.0
            aligned += [replace(e, start_ms=e.start_ms + shift, end_ms=e.end_ms + shift)
                        for e in row]
        return Timeline(self.plan.num_stages, tuple(aligned), "measured",
                        {"schedule": self.schedule.name, "microbatches": self.plan.microbatches,
                         "runner": "distributed", "training": training})

    def _data(self, inputs: Any, targets: Any, loss_fn: LossFn | None) -> StepData:
        first, last = self.index == 0, self.index == self.plan.num_stages - 1
        x = move_tree(inputs, self.stage.device) if first else None
        y = move_tree(targets, self.stage.device) if last and loss_fn is not None else None
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

    def train_step(self, inputs: Batch | None = None, targets: Batch | None = None,
                   loss_fn: LossFn | None = None, *, timeline: bool = False) -> StepResult:
        """One step of the plan's schedule on this rank. The first rank needs ``inputs``, the
        last ``targets`` and ``loss_fn`` (others may pass them too; they are ignored).
        Gradients accumulate in this rank's layers."""
        result, tl = self._step(self._data(inputs, targets, loss_fn), True, timeline)
        return StepResult(result.loss, tl)

    def forward(self, inputs: Batch | None = None) -> Batch | None:
        """Forward only, without autograd: the whole batch's outputs on the last rank."""
        result, _ = self._step(self._data(inputs, None, None), False, False)
        if not result.outputs:
            return None
        return join_tree(result.outputs) if self.graph_mode else gather(result.outputs)
