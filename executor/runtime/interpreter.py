"""The action interpreter: runs one stage's actions of a lowered schedule, one handler per kind.

    >>> import torch
    >>> from partitioner.schedule.generators import gpipe
    >>> from partitioner.schedule.ir import lower
    >>> stage = Stage(0, [(0, torch.nn.Linear(3, 1))], "cpu")
    >>> interp = Interpreter(stage, 1, transport=None)   # one stage: nothing to send
    >>> interp.begin(StepData.split(torch.ones(4, 3), torch.zeros(4, 1), 2, torch.nn.MSELoss()))
    >>> for action in lower(gpipe(1, 2)).actions[0]:
    ...     interp.run(action)
    >>> interp.end().loss is not None
    True

The runners only decide *where* actions run (one process, or one rank per schedule row); *what*
runs and in which order is the schedule's. A stage's state between actions lives here: the inputs
waiting for F, what B needs (the graph, or with re-materialisation only the input and the random
state), the weight-gradient work waiting for W, and the tensors waiting to be sent. The loss of
micro-batch i is weighted by b_i / B, so the summed loss and gradients are those of the whole
batch under a mean-reduced loss.

Split backward (``split``: the micro-batches whose backward the schedule runs as I then W, its
``Schedule.split`` on this stage): the forward that B would run backward through runs under
``splitgrad.deferring`` (at F; with re-materialisation, the replayed forward inside I), so I
computes only the input gradients and leaves the linear layers' weight gradients in the
micro-batch's ``WeightGrads``, which W applies::

    F(k,i)  forward, deferring into store_i       (recompute: no graph, only input and rng)
    I(k,i)  backward to the inputs; store_i fills  (recompute: replay under deferring first)
    W(k,i)  store_i.run(): weight gradients accumulated into .grad
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from executor.runtime.batch import Batch, as_tuple, batch_size, check_batch, from_tuple, scatter
from executor.runtime.batchnorm import DeferredBatchNorm
from executor.runtime.memory import ActivationMeter
from executor.runtime.recorder import Recorder
from executor.runtime.splitgrad import WeightGrads, deferring
from executor.runtime.stage import RngState, Stage  # noqa: F401 - Stage: for docs
from partitioner.cost.model import split_microbatches
from partitioner.schedule.ir import Action

#: The key of the model's output among a graph stage's results (``executor.graphs.stage``).
OUTPUT = "__output__"

__all__ = ["OUTPUT", "Interpreter", "LossFn", "Packet", "StageResult", "StepData", "Transport"]

LossFn = Callable[[Any, Any], torch.Tensor]
#: A chain ``Stage`` or a stage of a layer graph (``executor.graphs.stage.GraphStage``), which
#: also says where its values come from and go (``sources``, ``destinations``).
StageLike = Any


class Packet(NamedTuple):
    """What one stage sends another for one micro-batch: its tensors (detached), whether it was
    a tuple (a chain stage's output), for each tensor whether a gradient comes back (``grads``;
    None: the floating-point ones), and for a graph stage the template that puts the tensors
    back into its values (``executor.graphs.stage``)."""

    tensors: tuple[torch.Tensor, ...]
    is_tuple: bool
    grads: tuple[bool, ...] | None = None
    template: Any = None

    @property
    def needs_grad(self) -> tuple[bool, ...]:
        if self.grads is not None:
            return self.grads
        return tuple(t.is_floating_point() for t in self.tensors)

    @property
    def grad_like(self) -> tuple[tuple[torch.Size, torch.dtype], ...]:
        """Shapes and dtypes of the gradients that come back."""
        return tuple((t.shape, t.dtype) for t, g in zip(self.tensors, self.needs_grad,
                                                         strict=True) if g)


class Transport(Protocol):
    """Carries packets forward (stage -> a later stage ``peer``) and gradients backward (to an
    earlier one). Sends do not wait for the receiver; a receive blocks until the (kind, peer,
    micro-batch) it names arrived."""

    def send_activation(self, stage: int, peer: int, microbatch: int, packet: Packet) -> None: ...

    def recv_activation(self, stage: int, peer: int, microbatch: int) -> Packet: ...

    def send_grad(self, stage: int, peer: int, microbatch: int,
                  grads: tuple[torch.Tensor, ...]) -> None: ...

    def recv_grad(self, stage: int, peer: int, microbatch: int,
                  like: tuple[tuple[torch.Size, torch.dtype], ...]) -> tuple[torch.Tensor, ...]: ...


@dataclass
class StepData:
    """One step's input as a stage sees it: micro-batch sizes, the micro-batches of the inputs
    (first stage) and targets (last stage), and the loss (None: forward only). ``total``: the
    batch the micro-batch losses are weighted against (b_i / total; None: the sum of ``sizes``;
    with data-parallel replicas, the global batch B of which ``sizes`` are one share)."""

    sizes: list[int]
    inputs: list[Any] | None = None  # chain: Batch; graph: the model's inputs by value name
    targets: list[Any] | None = None
    loss_fn: LossFn | None = None
    total: int | None = None

    @staticmethod
    def split(inputs: object, targets: object, microbatches: int,
              loss_fn: LossFn | None) -> StepData:
        """Check the batch and cut it into M micro-batches (inputs or targets may be None on
        ranks that do not need them, but not both)."""
        x = check_batch(inputs, "inputs") if inputs is not None else None
        y = check_batch(targets, "targets") if targets is not None else None
        sizes_b = [batch_size(b) for b in (x, y) if b is not None]
        if not sizes_b:
            raise ValueError("give the inputs (first stage) or the targets (last stage)")
        if len(set(sizes_b)) > 1:
            raise ValueError(f"inputs have batch size {sizes_b[0]} but targets {sizes_b[1]}; "
                             f"give one target per sample")
        b = sizes_b[0]
        if b < microbatches:
            raise ValueError(f"the batch has B={b} samples but the plan splits it into "
                             f"M={microbatches} micro-batches; every micro-batch needs a sample: "
                             f"use a batch of at least {microbatches} or a plan with M <= {b}")
        sizes = split_microbatches(b, microbatches)
        return StepData(sizes, scatter(x, sizes) if x is not None else None,
                        scatter(y, sizes) if y is not None else None, loss_fn)


@dataclass
class StageResult:
    """What a stage returns after a step: the summed weighted loss (last stage, training), the
    outputs per micro-batch (last stage, forward only), and the most bytes of activations it
    held at once (training; ``executor.runtime.memory``: saved for backward and stashed)."""

    loss: torch.Tensor | None = None
    outputs: list[Batch] = field(default_factory=list)
    peak_activation_bytes: int = 0


@dataclass
class _Saved:
    """What B(k, i) or I(k, i) needs: the stage input, and either the output (graph kept) or
    the random state to replay the forward from; ``weights``: the store the forward deferred
    its weight gradients into (a split micro-batch that did not re-materialise)."""

    inputs: Any
    output: Any
    rng: RngState | None
    weights: WeightGrads | None = None


def _deferring(store: WeightGrads | None, modules: nn.Module) -> AbstractContextManager[Any]:
    return deferring(store, modules) if store is not None else nullcontext()


class Interpreter:
    """Runs the actions of ``stage`` (of ``num_stages``); a table maps each kind to its handler.
    ``split``: the micro-batches whose backward runs as I and W on this stage (see the module
    docstring); the others run B."""

    def __init__(self, stage: StageLike, num_stages: int, transport: Transport | None,
                 recorder: Recorder | None = None,
                 batchnorm: DeferredBatchNorm | None = None, split: Iterable[int] = ()) -> None:
        self.stage = stage
        self.split = frozenset(split)
        self.graph = bool(getattr(stage, "is_graph", False))  # a GraphStage of a layer graph
        self.first = stage.index == 0
        self.last = stage.index == num_stages - 1
        self.transport = transport
        self.recorder = recorder
        self.batchnorm = batchnorm
        self.meter = ActivationMeter(stage.module)
        self.handlers: dict[str, Callable[[Action], None]] = {
            "F": self._forward, "B": self._backward,
            "I": self._input_grad, "W": self._weight_grad,
            "SF": self._send_activation, "RF": self._recv_activation,
            "SB": self._send_grad, "RB": self._recv_grad,
        }
        self._data = StepData([])
        self._training = False
        self._clear()

    def _clear(self) -> None:
        for store in getattr(self, "_weights", {}).values():
            store.clear()  # an aborted step: drop the work, do not apply it
        self._weights: dict[int, WeightGrads] = {}  # split micro-batches from I until W
        self._inbox: dict[int, Any] = {}
        self._outbox: dict[int, dict[int, Packet]] = {}
        self._out_meta: dict[int, dict[int, tuple[tuple[torch.Size, torch.dtype], ...]]] = {}
        self._saved: dict[int, _Saved] = {}
        self._grad_in: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {}
        self._grad_out: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {}
        self._outputs: dict[int, Any] = {}
        self._loss: torch.Tensor | None = None

    # -- step ------------------------------------------------------------------------------------

    def begin(self, data: StepData, training: bool = True) -> None:
        """Start a step (training: F and B; else forward only, without autograd)."""
        if self.first and data.inputs is None:
            raise ValueError(f"stage {self.stage.index} is the first stage: give it the inputs")
        if self.last and training and (data.targets is None or data.loss_fn is None):
            raise ValueError(f"stage {self.stage.index} is the last stage: give it the targets "
                             f"and the loss function")
        self._clear()
        self.meter.begin_step((data.inputs if self.first else None,
                               data.targets if self.last and training else None))
        self._data, self._training = data, training
        if self.first:
            assert data.inputs is not None
            self._inbox = dict(enumerate(data.inputs))
        if training and self.batchnorm is not None:
            self.batchnorm.begin_step()

    def run(self, action: Action) -> None:
        """Run one action through its handler (timed when there is a recorder)."""
        handler = self.handlers.get(action.kind)
        if handler is None:
            raise ValueError(f"action {action}: kind {action.kind!r} has no handler; the "
                             f"executor runs kinds {', '.join(self.handlers)}")
        if action.stage != self.stage.index:
            raise ValueError(f"action {action} belongs to stage {action.stage}, not to stage "
                             f"{self.stage.index}")
        try:
            if self.recorder is None:
                handler(action)
            else:
                with self.recorder.record(action):
                    handler(action)
        except Exception as exc:  # say where, keeping the error's type and message
            if not any("in action" in note for note in getattr(exc, "__notes__", ())):
                exc.add_note(f"in action {action} (stage {action.stage}, "
                             f"micro-batch {action.microbatch})")
            raise

    def end(self) -> StageResult:
        """Finish the step; every micro-batch must have gone through."""
        left = {name: sorted(box) for name, box in (
            ("inputs not forwarded", self._inbox), ("outputs not sent", self._outbox),
            ("backwards not run", self._saved), ("weight gradients not run", self._weights),
            ("gradients not used", self._grad_in),
            ("gradients not sent", self._grad_out)) if box}
        if left:
            raise RuntimeError(f"stage {self.stage.index} ended the step with " + "; ".join(
                f"{name}: micro-batches {mbs}" for name, mbs in left.items()))
        if self._training and self.batchnorm is not None:
            self.batchnorm.end_step()
        result = StageResult(self._loss, [self._outputs[i] for i in sorted(self._outputs)],
                             self.meter.peak_bytes if self._training else 0)
        self._clear()
        return result

    # -- handlers --------------------------------------------------------------------------------

    def _take(self, box: dict[int, Any], action: Action, what: str) -> Any:
        if action.microbatch not in box:
            raise RuntimeError(f"action {action}: {what} of micro-batch {action.microbatch} is "
                               f"not there; the schedule runs this action too early")
        return box.pop(action.microbatch)

    def _weighted_loss(self, output: Batch, i: int) -> torch.Tensor:
        data = self._data
        assert data.loss_fn is not None and data.targets is not None
        loss = data.loss_fn(output, data.targets[i])
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"the loss function must return a scalar tensor, got "
                            f"{type(loss).__name__} {getattr(loss, 'shape', '')}")
        return loss.reshape(()) * (data.sizes[i] / (data.total or sum(data.sizes)))

    def _result(self, y: Any) -> Any:
        """The model's output from what the last stage computed."""
        return y[OUTPUT] if self.graph else y

    def _forward(self, action: Action) -> None:
        i = action.microbatch
        x = self._take(self._inbox, action, "the input")
        if not self._training:
            with torch.no_grad():
                y = self.stage(x)
            self._emit(i, y)
            return
        recompute = self.stage.recompute
        rng = self.stage.rng_state() if recompute else None
        store = WeightGrads() if i in self.split and not recompute else None
        meter = self.meter
        with torch.set_grad_enabled(not recompute), _deferring(store, self.stage.module), \
                meter.saving() as saved:
            y = self.stage(x)
            loss = self._weighted_loss(self._result(y), i) if self.last else None
        meter.hold(i, meter.storages(x), saved)
        if loss is not None:
            self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
            self._saved[i] = _Saved(x, None if recompute else loss, rng, store)
        else:
            self._saved[i] = _Saved(x, None if recompute else y, rng, store)
            self._emit(i, y)

    def _emit(self, i: int, y: Any) -> None:
        if self.last:
            self._outputs[i] = self._result(y)
            return
        if self.graph:
            packets = self.stage.packets(y)
        else:
            tensors = tuple(t.detach() for t in as_tuple(y))
            packets = {self.stage.index + 1: Packet(tensors, isinstance(y, tuple))}
        self._outbox[i] = packets
        self._out_meta[i] = {dst: p.grad_like for dst, p in packets.items()}

    def _backward(self, action: Action) -> None:
        """B = I + W (a micro-batch whose forward deferred gets its W at once)."""
        store = self._gradients(action)
        if store is not None:
            store.run()
        self.meter.release(action.microbatch)

    def _input_grad(self, action: Action) -> None:
        i = action.microbatch
        if i not in self.split:
            raise RuntimeError(f"action {action}: micro-batch {i} is not among the split ones "
                               f"of stage {self.stage.index} ({sorted(self.split)}), so its "
                               f"forward kept the weight gradients in the graph; give the "
                               f"interpreter split= the micro-batches the schedule runs I and W "
                               f"for on this stage (Schedule.split)")
        store = self._gradients(action)
        assert store is not None  # the forward, or its re-materialisation, deferred into it
        self._weights[i] = store
        self.meter.hold(i, self.meter.storages(store.tensors()))  # the graph is gone

    def _weight_grad(self, action: Action) -> None:
        self._take(self._weights, action, "the deferred weight-gradient work").run()
        self.meter.release(action.microbatch)

    def _gradients(self, action: Action) -> WeightGrads | None:
        """Backward of micro-batch i through the stage: every gradient, or with a deferring
        forward the input gradients only; returns the store holding the deferred work."""
        i = action.microbatch
        saved: _Saved = self._take(self._saved, action, "the forward state")
        output, store = saved.output, saved.weights
        if output is None:  # re-materialise from the stage input, replaying the random state
            assert saved.rng is not None
            store = WeightGrads() if i in self.split else None
            with self.stage.replaying(saved.rng), torch.enable_grad(), \
                    _deferring(store, self.stage.module), self.meter.saving() as rebuilt:
                output = self.stage(saved.inputs)
                if self.last:
                    output = self._weighted_loss(self._result(output), i)
            self.meter.rebuild(i, rebuilt)
        if self.last:
            assert isinstance(output, torch.Tensor)
            output.backward()  # type: ignore[no-untyped-call]
        else:
            grads = self._take(self._grad_in, action, "the output gradient")
            if self.graph:
                roots, root_grads = self.stage.backward_roots(output, grads)
            else:
                outs = [t for t in as_tuple(output) if t.is_floating_point()]
                pairs = [(o, g) for o, g in zip(outs, grads[self.stage.index + 1], strict=True)
                         if o.requires_grad]
                roots, root_grads = [o for o, _ in pairs], [g for _, g in pairs]
            if roots:
                torch.autograd.backward(roots, root_grads)
        if self.first:
            return store
        if self.graph:
            self._grad_out[i] = self.stage.input_grads(saved.inputs)
        else:
            leaves = [t for t in as_tuple(saved.inputs) if t.is_floating_point()]
            self._grad_out[i] = {self.stage.index - 1: tuple(
                t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves)}
        return store

    def _send_activation(self, action: Action) -> None:
        assert self.transport is not None
        k = self.stage.index
        for dst, packet in self._take(self._outbox, action, "the output").items():
            self.transport.send_activation(k, dst, action.microbatch, packet)

    def _recv_activation(self, action: Action) -> None:
        assert self.transport is not None
        k, i = self.stage.index, action.microbatch
        if self.graph:
            packets = {src: self.transport.recv_activation(k, src, i)
                       for src in self.stage.sources}
            self._inbox[i] = self.stage.unpack(packets, self._training)
            return
        packet = self.transport.recv_activation(k, k - 1, i)
        tensors = [t.requires_grad_(True) if self._training and needs else t
                   for t, needs in zip(packet.tensors, packet.needs_grad, strict=True)]
        self._inbox[i] = from_tuple(tensors, packet.is_tuple)

    def _send_grad(self, action: Action) -> None:
        assert self.transport is not None
        k = self.stage.index
        for src, grads in self._take(self._grad_out, action, "the input gradient").items():
            self.transport.send_grad(k, src, action.microbatch, grads)

    def _recv_grad(self, action: Action) -> None:
        assert self.transport is not None
        k, i = self.stage.index, action.microbatch
        self._grad_in[i] = {dst: self.transport.recv_grad(k, dst, i, like)
                            for dst, like in self._out_meta.pop(i).items()}
