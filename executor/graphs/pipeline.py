"""``Pipeline(model, plan)`` for any model: an ``nn.Sequential`` chain, or a traced graph of layers.

    >>> import torch
    >>> from torch import nn
    >>> from executor.runtime.pipeline import manual_plan
    >>> class Skip(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)
    ...     def forward(self, x):
    ...         return {"y": self.b(torch.tanh(self.a(x)) + x)}
    >>> model = Skip()
    >>> plan = manual_plan([0, 1, 3], microbatches=2, global_batch=4, traced=True)
    >>> pipe = Pipeline(model, plan, sample=torch.ones(2, 4))
    >>> loss = pipe.train_step(torch.ones(4, 4), torch.zeros(4, 1), lambda out, y: ((out["y"] - y) ** 2).mean())
    >>> model.a.weight.grad is not None, pipe(torch.ones(4, 4))["y"].shape
    (True, torch.Size([4, 1]))

An ``nn.Sequential`` runs as a chain of its children (a plan's stages must be ranges of them).
Any other model is traced into layers (``executor.graphs.layers``) on ``sample``, or on the first micro-batch it is given, and
the plan is checked against the trace before any work (``planned.plan_nodes``). Stage k runs its
layers on its device; values reach the stages that read them straight from the stages that
made them. Inputs may be a tensor, a tuple of positional inputs or a dict of keyword inputs;
``loss_fn(output, targets)`` gets each micro-batch's output exactly as the model returns it.
A graph captured by torch.export fixes the training mode, so the model is traced again (once
per mode) when ``model.train()`` / ``model.eval()`` changes it. A parameter used on several
stages (tied weights) is one parameter when those stages share a device, so its gradient is
the sum of both uses; on different devices it is refused here (the distributed runner keeps a
copy per rank and sums their gradients).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from executor.graphs.batches import batch_size_of, join_tree, move_tree, split_tree
from executor.graphs.blocks import Leaf
from executor.graphs.layers import LayerGraph, as_call
from executor.graphs.planned import plan_nodes, trace_for_plan
from executor.graphs.stage import GraphStage, graph_stages
from executor.runtime.allocator import keep_freed_memory as keep_memory
from executor.runtime.interpreter import LossFn, StepData
from executor.runtime.local import LocalRunner
from executor.runtime.pipeline import Pipeline as ChainPipeline
from executor.runtime.pipeline import as_plan, check_devices, one_replica
from partitioner.cost.model import split_microbatches
from partitioner.formats.plan import Plan, PlanError
from partitioner.formats.timeline import Timeline

__all__ = ["Pipeline", "split_step"]


@dataclass
class _Built:
    graph: LayerGraph
    stages: list[GraphStage]
    runner: LocalRunner


def split_step(graph: LayerGraph, inputs: Any, targets: Any, microbatches: int,
               loss_fn: LossFn | None) -> StepData:
    """The step's micro-batches as the first stage takes them (the model's inputs by value
    name) and the targets as the last stage's loss takes them."""
    b = batch_size_of(inputs)
    if targets is not None and batch_size_of(targets, "targets") != b:
        raise ValueError(f"inputs have batch size {b} but targets "
                         f"{batch_size_of(targets, 'targets')}; give one target per sample")
    if b < microbatches:
        raise ValueError(f"the batch has B={b} samples but the plan splits it into "
                         f"M={microbatches} micro-batches; use a batch of at least "
                         f"{microbatches} or a plan with M <= {b}")
    sizes = split_microbatches(b, microbatches)
    parts = split_tree(as_call(inputs), sizes)
    envs = [graph.inputs_of(args, kwargs) for args, kwargs in parts]
    return StepData(sizes, envs, split_tree(targets, sizes) if targets is not None else None,
                    loss_fn)


class Pipeline:
    """Train ``model`` as ``plan`` says, in this process (see the module docstring);
    ``sample`` (optional) traces a graph model at once instead of at its first step, and
    ``leaves`` overrides the plan's record of which modules are layers."""

    def __init__(self, model: nn.Module, plan: Plan | Mapping[str, object] | str | Path,
                 devices: Sequence[str | torch.device] | None = None, *,
                 sample: Any = None, leaves: Sequence[Leaf] | None = None,
                 deferred_batchnorm: bool = False, keep_freed_memory: bool = False) -> None:
        plan = one_replica(as_plan(plan))
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.graph_mode = not isinstance(model, nn.Sequential)  # a Sequential stays a chain
        self.plan, self.model, self.leaves = plan, model, leaves
        self.last_timeline: Timeline | None = None
        self._chain: ChainPipeline | None = None
        if not self.graph_mode:
            assert isinstance(model, nn.Sequential)
            self._chain = ChainPipeline(model, plan, devices,
                                        deferred_batchnorm=deferred_batchnorm,
                                        keep_freed_memory=keep_freed_memory)
            self.devices = self._chain.devices
            return
        if deferred_batchnorm:
            raise ValueError("deferred_batchnorm works with nn.Sequential chains only; a traced "
                             "model normalises each micro-batch (train it micro-batch by "
                             "micro-batch to compare)")
        chosen = devices if devices is not None else [s.device for s in plan.stages]
        self.devices = check_devices(chosen, plan.num_stages)
        if keep_freed_memory:
            keep_memory()
        self._built: dict[bool, _Built] = {}
        if sample is not None:
            self._build(sample)

    # -- graph ----------------------------------------------------------------------------

    def _key(self) -> bool:
        traced = next(iter(self._built.values()), None)
        exported = traced is None or traced.graph.capture.tracer == "export"
        return self.model.training if exported else True

    def _build(self, sample: Any) -> _Built:
        key = self._key()
        if key in self._built:
            return self._built[key]
        first = torch.device(self.devices[0])
        graph = trace_for_plan(self.model, self.plan, move_tree(sample, first), self.leaves)
        nodes = plan_nodes(self.plan, graph)
        stage_of = {i: k for k, members in enumerate(nodes) for i in members}
        for name, users in graph.tied().items():
            devs = {torch.device(self.devices[stage_of[i]]) for i in users}
            if len(devs) > 1:
                raise PlanError(f"parameter {name!r} is used by layers {users} on stages on "
                                f"devices {sorted(map(str, devs))}; in one process a tied "
                                f"parameter needs its stages on one device (or use the "
                                f"distributed runner, which keeps a copy per rank)")
        recompute = [self.plan.recomputes(k) for k in range(self.plan.num_stages)]
        stages = graph_stages(graph, nodes, self.devices, recompute)
        runner = LocalRunner(stages, self.plan.build_schedule(), self.plan.microbatches)
        self._built[key] = _Built(graph, stages, runner)
        return self._built[key]

    @property
    def stages(self) -> list[Any]:
        """The stages (a graph model's once traced)."""
        if self._chain is not None:
            return list(self._chain.stages)
        built = self._built.get(self._key())
        return list(built.stages) if built is not None else []

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    @property
    def layer_graph(self) -> LayerGraph | None:
        """The traced layers (None until traced, and for a chain)."""
        built = self._built.get(self._key()) if self._chain is None else None
        return built.graph if built is not None else None

    @property
    def transport_log(self) -> list[tuple[str, int, int, int, int]]:
        """The messages of the last step: (kind, source, destination, micro-batch, bytes)."""
        if self._chain is not None:
            return list(self._chain.runner.transport.sent)
        built = self._built.get(self._key())
        return list(built.runner.transport.sent) if built is not None else []

    def train_step(self, inputs: Any, targets: Any, loss_fn: LossFn) -> torch.Tensor:
        """One step of the plan's schedule: the batch's loss (detached); gradients accumulate
        in the model's parameters."""
        if self._chain is not None:
            loss = self._chain.train_step(inputs, targets, loss_fn)
            self.last_timeline = self._chain.last_timeline
            return loss
        first, last = torch.device(self.devices[0]), torch.device(self.devices[-1])
        inputs = move_tree(inputs, first)
        built = self._build(_first_rows(inputs, self.plan.microbatches))
        data = split_step(built.graph, inputs, move_tree(targets, last),
                          self.plan.microbatches, loss_fn)
        results, self.last_timeline = built.runner.run_data(data, True)
        result = results[-1].loss
        assert result is not None
        return result

    def __call__(self, inputs: Any) -> Any:
        """Forward only (no autograd): the model's output for the whole batch."""
        if self._chain is not None:
            out = self._chain(inputs)
            self.last_timeline = self._chain.last_timeline
            return out
        inputs = move_tree(inputs, torch.device(self.devices[0]))
        built = self._build(_first_rows(inputs, self.plan.microbatches))
        data = split_step(built.graph, inputs, None, self.plan.microbatches, None)
        results, self.last_timeline = built.runner.run_data(data, False)
        return join_tree(results[-1].outputs)


def _first_rows(inputs: Any, microbatches: int) -> Any:
    """A tracing sample: the first micro-batch of the inputs."""
    b = batch_size_of(inputs)
    return split_tree(inputs, split_microbatches(b, min(microbatches, b)))[0]
