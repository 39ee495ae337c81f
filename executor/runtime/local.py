"""The local runner: all stages in one process, each on its own device (or all on one).

    >>> import torch
    >>> from executor.runtime.stage import Stage
    >>> layers = [(0, torch.nn.Linear(4, 4)), (1, torch.nn.Linear(4, 1))]
    >>> runner = LocalRunner([Stage(0, layers[:1], "cpu"), Stage(1, layers[1:], "cpu")],
    ...                      schedule="1f1b", microbatches=3)
    >>> loss, timeline = runner.train_step(torch.ones(5, 4), torch.zeros(5, 1), torch.nn.MSELoss())
    >>> len(timeline.events)   # 3 x (F, B) per stage + 3 x (SF, RF, SB, RB)
    24

The schedule is any the IR can say: a generator's name (``gpipe``, ``1f1b``, ``interleaved`` with
``stages_per_rank``, ``zb-h1``, ``zbv``) or a ``Schedule`` (``plan.build_schedule()``, a
synthesised one). The runner walks the lowered schedule in the order of its unit-time replay
(``Schedule.clock``), which is the schedule's own order: the runner adds none; its placement of
stages on ranks does not matter here, each stage keeps its own device. Tensors cross between
stages through an in-process mailbox keyed by (kind, stage, micro-batch), copied to the receiving
stage's device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from executor.runtime.batch import Batch, gather
from executor.runtime.batchnorm import DeferredBatchNorm
from executor.runtime.interpreter import (
    Interpreter,
    LossFn,
    Packet,
    StageLike,
    StageResult,
    StepData,
)
from executor.runtime.recorder import Recorder
from partitioner.formats.timeline import Timeline
from partitioner.schedule.generators import make_schedule
from partitioner.schedule.ir import Action, Schedule, lower, validate

__all__ = ["LocalRunner", "LocalTransport", "run_order", "runnable_schedule", "split_of"]

FORWARD_KINDS = ("F", "SF", "RF")


def run_order(schedule: Schedule) -> list[Action]:
    """All stages' actions of a schedule as one sequence that respects every dependency: its
    unit-time replay, read clock by clock and stage by stage."""
    rows = schedule.clock()
    if rows is None:
        validate(schedule)  # raises, naming the deadlock
        raise AssertionError("validate accepted a schedule that cannot run")
    return [a for row in rows for a in row if a is not None]


def runnable_schedule(schedule: str | Schedule, stages: int, microbatches: int | None,
                      stages_per_rank: int = 1) -> Schedule:
    """The lowered, validated schedule a runner runs: ``schedule`` by name (built for K
    ``stages``, M ``microbatches``, V ``stages_per_rank``) or as given (lowered here unless it
    is), which must be for K stages (and M micro-batches when given)."""
    if isinstance(schedule, str):
        if microbatches is None:
            raise ValueError(f"schedule {schedule!r} by name needs the number of micro-batches "
                             f"M; give microbatches=, or pass a Schedule")
        schedule = make_schedule(schedule, stages, microbatches, stages_per_rank)
    elif not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a schedule's name or a Schedule, got "
                        f"{type(schedule).__name__}")
    problems = []
    if schedule.stages != stages:
        problems.append(f"it has K={schedule.stages} stages but the runner {stages}")
    if microbatches is not None and schedule.microbatches != microbatches:
        problems.append(f"it has M={schedule.microbatches} micro-batches but the runner was "
                        f"given M={microbatches}")
    if problems:
        raise ValueError(f"schedule {schedule.name!r} does not fit: " + "; ".join(problems)
                         + "; build the schedule for these stages (plan.build_schedule())")
    return validate(schedule if schedule.is_lowered else lower(schedule))


def split_of(schedule: Schedule, stage: int) -> frozenset[int]:
    """The micro-batches whose backward ``schedule`` splits into I and W on ``stage``."""
    return frozenset(i for k, i in schedule.split if k == stage)


class LocalTransport:
    """In-process mailbox between the stages on ``devices``; ``sent`` records every message of
    the step as (kind 'F' or 'B', source stage, destination stage, micro-batch, tensor bytes)."""

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.devices = list(devices)
        self._box: dict[tuple[str, int, int, int], object] = {}
        self.sent: list[tuple[str, int, int, int, int]] = []

    def _pop(self, key: tuple[str, int, int, int]) -> object:
        if key not in self._box:
            what = "activation" if key[0] == "F" else "gradient"
            raise RuntimeError(f"stage {key[2]} receives the {what} of micro-batch {key[3]} "
                               f"from stage {key[1]} before it was sent")
        return self._box.pop(key)

    @staticmethod
    def _bytes(tensors: Sequence[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    def send_activation(self, stage: int, peer: int, microbatch: int, packet: Packet) -> None:
        dev = self.devices[peer]
        self._box["F", stage, peer, microbatch] = packet._replace(
            tensors=tuple(t.to(dev) for t in packet.tensors))
        self.sent.append(("F", stage, peer, microbatch, self._bytes(packet.tensors)))

    def recv_activation(self, stage: int, peer: int, microbatch: int) -> Packet:
        packet = self._pop(("F", peer, stage, microbatch))
        assert isinstance(packet, Packet)
        return packet

    def send_grad(self, stage: int, peer: int, microbatch: int,
                  grads: tuple[torch.Tensor, ...]) -> None:
        dev = self.devices[peer]
        self._box["B", stage, peer, microbatch] = tuple(g.to(dev) for g in grads)
        self.sent.append(("B", stage, peer, microbatch, self._bytes(grads)))

    def recv_grad(self, stage: int, peer: int, microbatch: int,
                  like: tuple[tuple[torch.Size, torch.dtype], ...]) -> tuple[torch.Tensor, ...]:
        grads = self._pop(("B", peer, stage, microbatch))
        assert isinstance(grads, tuple)
        return grads


class LocalRunner:
    """Runs ``schedule`` (a name, with M ``microbatches`` and V ``stages_per_rank``, or a
    ``Schedule``) over ``stages`` (stage k is ``stages[k]``) in one process;
    ``deferred_batchnorm`` updates BatchNorm statistics once per mini-batch."""

    def __init__(self, stages: Sequence[StageLike], schedule: str | Schedule,
                 microbatches: int | None = None, deferred_batchnorm: bool = False, *,
                 stages_per_rank: int = 1) -> None:
        self.stages = list(stages)
        big_k = len(self.stages)
        wrong = [f"stages[{k}] is stage {s.index}" for k, s in enumerate(self.stages)
                 if s.index != k]
        if wrong:
            raise ValueError(f"the stages must come in pipeline order: {', '.join(wrong)}")
        self.schedule = runnable_schedule(schedule, big_k, microbatches, stages_per_rank)
        self.microbatches = self.schedule.microbatches
        self.order = run_order(self.schedule)
        self.forward_order = [a for a in self.order if a.kind in FORWARD_KINDS]
        self.transport = LocalTransport([s.device for s in self.stages])
        self.interpreters = [
            Interpreter(s, big_k, self.transport, Recorder(s.device),
                        DeferredBatchNorm(s.module) if deferred_batchnorm else None,
                        split=split_of(self.schedule, s.index))
            for s in self.stages]

    def _run(self, order: Sequence[Action], data: StepData, training: bool) -> Timeline:
        first, last = self.interpreters[0], self.interpreters[-1]
        t0 = time.perf_counter()
        self.transport.sent.clear()
        for interp in self.interpreters:
            assert interp.recorder is not None
            interp.recorder.reset(t0)
            interp.begin(StepData(data.sizes,
                                  data.inputs if interp is first else None,
                                  data.targets if interp is last else None,
                                  data.loss_fn), training)
        for action in order:
            self.interpreters[action.stage].run(action)
        events = []
        for interp in self.interpreters:
            assert interp.recorder is not None
            events += interp.recorder.events()
        return Timeline(len(self.stages), tuple(events), "measured",
                        {"schedule": self.schedule.name, "microbatches": self.microbatches,
                         "runner": "local", "training": training})

    def run_data(self, data: StepData, training: bool) -> tuple[list[StageResult], Timeline]:
        """One step on micro-batches already cut (``data``): every stage's result and the
        measured timeline (training: F and B; else forward only)."""
        timeline = self._run(self.order if training else self.forward_order, data, training)
        return self._end(timeline, training)

    def _end(self, timeline: Timeline, training: bool) -> tuple[list[StageResult], Timeline]:
        """End the step on every stage; a training step's timeline also gets each stage's
        peak activation bytes (``stage_activation_peak_bytes``, ``executor.runtime.memory``)."""
        results = [interp.end() for interp in self.interpreters]
        if training:
            timeline = replace(timeline, meta={**timeline.meta, "stage_activation_peak_bytes":
                                               [r.peak_activation_bytes for r in results]})
        return results, timeline

    def train_step(self, inputs: Batch, targets: Batch,
                   loss_fn: LossFn) -> tuple[torch.Tensor, Timeline]:
        """One step: the whole batch's loss (detached, on the last stage's device) and the
        measured timeline; gradients accumulate in the stages' parameters."""
        data = StepData.split(inputs, targets, self.microbatches, loss_fn)
        results, timeline = self._end(self._run(self.order, data, training=True), True)
        loss = results[-1].loss
        assert loss is not None
        return loss, timeline

    def forward(self, inputs: Batch) -> tuple[Batch, Timeline]:
        """Forward only, without autograd: the outputs of the whole batch, joined."""
        data = StepData.split(inputs, None, self.microbatches, None)
        timeline = self._run(self.forward_order, data, training=False)
        results = [interp.end() for interp in self.interpreters]
        return gather(results[-1].outputs), timeline
