"""The timing harness behind the profiler: one module's forward/backward time and memory.

    >>> import torch
    >>> m = measure(torch.nn.Linear(4, 4), torch.ones(2, 4), torch.device("cpu"), repeat=3)
    >>> m.saved_bytes                 # a Linear saves its input: 2 x 4 float32
    32

A *batch* is a tensor or a tuple of tensors, as a child of an ``nn.Sequential`` takes and
returns. Each repetition runs the forward on a fresh copy of the input (so in-place layers
see the same values every time) and the backward as training runs it: into ``.grad`` of the
floating inputs and the parameters, the parameters' gradients accumulating into buffers that
already exist (as for every micro-batch after a step's first); the module's own ``.grad``
are put back afterwards. With ``split=True``, further repetitions time the split backward of
zero-bubble schedules: the forward under ``splitgrad.deferring``, the backward (I, input
gradients only) and then the deferred weight gradients (W, ``WeightGrads.run``).
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from executor.runtime.batch import Batch, like
from executor.runtime.memory import ActivationMeter
from executor.runtime.splitgrad import WeightGrads, deferring

__all__ = ["CLOCKS", "Clock", "Measurement", "as_batch", "as_tensors", "batch_nbytes",
           "harness_overhead_ms", "measure", "prepare_batch", "quiet_gc",
           "slice_batch", "timing_problems"]



@dataclass(frozen=True)
class Measurement:
    """Median times of one module at one input, and its memory (peak_bytes on CUDA only);
    ``bwd_input_ms``/``bwd_weight_ms`` (I and W of a split backward) when measured."""

    fwd_ms: float
    bwd_ms: float
    has_backward: bool
    in_bytes: int
    out_bytes: int
    saved_bytes: int
    peak_bytes: int | None
    output: Batch
    bwd_input_ms: float | None = None
    bwd_weight_ms: float | None = None
    saved_input_bytes: int = 0  # of saved_bytes: storages of the module's input
    saved_output_bytes: int = 0  # and of its output
    held_for_w_bytes: int | None = None  # split: what the deferred weight gradients keep
    held_for_w_input_bytes: int | None = None  # of that: storages of the module's input


def as_tensors(x: object, what: str) -> tuple[Tensor, ...]:
    """The tensors of a batch; TypeError for anything but a tensor or a tuple of tensors."""
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, tuple) and x and all(isinstance(t, Tensor) for t in x):
        return x
    kind = type(x).__name__ if not isinstance(x, tuple) else \
        f"tuple of ({', '.join(type(t).__name__ for t in x)})"
    raise TypeError(f"{what} is a {kind}; the profiler needs a tensor or a non-empty tuple of "
                    f"tensors (each child of the nn.Sequential must take and return one)")


def chain_problems(model: object, sample: object, who: str
                   ) -> tuple[nn.Sequential, tuple[Tensor, ...], list[str], int]:
    """What the profilers check first: ``model`` an ``nn.Sequential`` (TypeError, naming
    ``who`` needs it), its sample's tensors; returns them with the problems found so far
    (no layers, tensors of different batch sizes) and the sample's rows."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"the model is a {type(model).__name__}; {who} needs an "
                        f"nn.Sequential whose children are the pipeline's layers "
                        f"(wrap or flatten the model into one)")
    tensors = as_tensors(sample, "the sample batch")
    problems = []
    if len(model) == 0:
        problems.append("the nn.Sequential has no layers")
    rows = {t.shape[0] if t.dim() else 0 for t in tensors}
    if len(rows) != 1 or 0 in rows:
        problems.append(f"the sample's tensors have first dimensions {sorted(rows)}; give a "
                        f"batch whose tensors all share one first (batch) dimension >= 1")
    return model, tensors, problems, max(rows)


def batch_nbytes(x: Batch) -> int:
    return sum(t.numel() * t.element_size() for t in as_tensors(x, "batch"))


def rebuild_batch(x: Batch, ts: Sequence[Tensor]) -> Batch:
    """``ts`` shaped as ``x``: the one tensor if ``x`` is a tensor, else a tuple."""
    return ts[0] if isinstance(x, Tensor) else tuple(ts)


def slice_batch(x: Batch, b: int) -> Batch:
    """The first ``b`` rows of every tensor, as fresh contiguous tensors (their own storage)."""
    return like(x, [t[:b].clone(memory_format=torch.contiguous_format)
                        for t in as_tensors(x, "batch")])


def prepare_batch(x: Batch, device: torch.device, dtype: torch.dtype | None) -> Batch:
    """Move to ``device`` and cast floating tensors to ``dtype``; integer tensors stay integer."""
    def move(t: Tensor) -> Tensor:
        to_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return t.detach().to(device=device, dtype=to_dtype)
    return like(x, [move(t) for t in as_tensors(x, "batch")])


CLOCKS = ("wall", "thread")


class Clock:
    """Wall time (perf_counter) or this thread's CPU time on the CPU; CUDA events (then one
    synchronize) on a GPU. The thread clock ignores time the OS gives to other processes, so
    it suits a shared machine, but it only sees work done on this thread (torch threads = 1).
    """

    def __init__(self, device: torch.device, clock: str = "wall") -> None:
        self.cuda = device.type == "cuda"
        self.now = time.thread_time if clock == "thread" else time.perf_counter

    def mark(self) -> float | torch.cuda.Event:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            event.record()
            return event
        return self.now()

    def elapsed_ms(self, marks: Sequence[float | torch.cuda.Event]) -> list[float]:
        """Milliseconds between successive marks."""
        if self.cuda:
            torch.cuda.synchronize()  # the events' work is done, so their times are final
            events = cast("list[torch.cuda.Event]", marks)
            return [float(a.elapsed_time(b)) for a, b in itertools.pairwise(events)]
        seconds = cast("list[float]", marks)
        return [1000.0 * (b - a) for a, b in itertools.pairwise(seconds)]


@contextmanager
def quiet_gc() -> Iterator[None]:
    """No garbage collection pauses inside timed regions (collect once before entering)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Step:
    """One forward+backward of ``module`` on a fresh copy of ``x``."""

    def __init__(self, module: nn.Module, x: Batch, input_grad: bool) -> None:
        self.module = module
        self.x = x
        self.input_grad = input_grad
        self.params = [p for p in module.parameters() if p.requires_grad]

    def inputs(self) -> tuple[Batch, list[Tensor]]:
        """A fresh input (non-leaf, so in-place layers work) and the leaves to differentiate."""
        leaves, fresh = [], []
        for t in as_tensors(self.x, "input"):
            if self.input_grad and t.is_floating_point():
                leaf = t.detach().requires_grad_(True)
                leaves.append(leaf)
                fresh.append(leaf.clone())
            else:
                fresh.append(t.clone())
        return like(self.x, fresh), leaves + self.params

    def differentiable(self, out: Batch) -> list[Tensor]:
        """The outputs the backward starts from (those that require grad)."""
        return [t for t in as_tensors(out, "output") if t.requires_grad]


class _Flusher:
    """Evicts the caches between timed regions, as the rest of the model does in a real step:
    a layer's weights and saved tensors are not still cached when its turn comes."""

    def __init__(self, device: torch.device, flush_bytes: int) -> None:
        self.buf = torch.zeros(flush_bytes // 4, device=device) if flush_bytes > 0 else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.add_(1.0)  # reads and writes every line


def measure(module: nn.Module, x: Batch, device: torch.device, *, input_grad: bool = True,
            warmup: int = 2, repeat: int = 5, clock: str = "wall",
            flush_bytes: int = 0, name: str = "module", split: bool = False,
            held_for_w: bool | None = None) -> Measurement:
    """Median forward and backward time of ``module`` on ``x`` (already on ``device``), with
    in/out/saved bytes and, on CUDA, the allocator peak of one forward+backward.

    ``input_grad``: whether the backward also computes the gradient of the floating inputs
    (True for every layer but the first, whose input is data). ``clock``: one of ``CLOCKS``
    (ignored on CUDA, which always uses events). ``flush_bytes``: size of a buffer written
    before each timed forward and backward to evict the caches (0: no flush; e.g. twice the
    L2 size to time a layer whose weights come from memory); the input and the output
    gradient are made after it, so they are cached as if just made by the neighbouring layer.
    ``split``: also time I and W (``_time_split``), in as many further repetitions.
    ``held_for_w`` (default: ``split``): also count what a split backward keeps until W.
    """
    step = _Step(module, x, input_grad)
    timer = Clock(device, clock)
    flush = _Flusher(device, flush_bytes)
    fwd_ms: list[float] = []
    bwd_ms: list[float] = []
    has_backward = False
    own_grads = [p.grad for p in step.params]
    for p in step.params:  # accumulate, as a training step does after its first micro-batch
        p.grad = torch.zeros_like(p)
    with torch.enable_grad(), quiet_gc(), _restoring(step.params, own_grads):
        for r in range(warmup + repeat):
            flush()
            xin, wrt = step.inputs()
            t0 = timer.mark()
            out = module(xin)
            t1 = timer.mark()
            outs = step.differentiable(as_batch(out, name))
            has_backward = bool(outs and wrt)
            flush()
            grads = [torch.ones_like(t) for t in outs]
            t2 = timer.mark()
            if has_backward:
                torch.autograd.backward(outs, grads, inputs=wrt)
            t3 = timer.mark()
            f, _, b = timer.elapsed_ms([t0, t1, t2, t3])
            if r >= warmup:
                fwd_ms.append(f)
                bwd_ms.append(b if has_backward else 0.0)
            del out, outs, grads, xin, wrt
        i_ms, w_ms = (_time_split(step, timer, flush, warmup, repeat, name) if split
                      else (None, None))
        saved, saved_in, saved_out, output = _saved_bytes(step, name)
        held_w, held_w_in = (_held_for_w(step, name) if (split if held_for_w is None
                                                          else held_for_w) else (None, None))
        peak = _peak_bytes(step, name) if device.type == "cuda" else None
    return Measurement(statistics.median(fwd_ms), statistics.median(bwd_ms), has_backward,
                       batch_nbytes(x), batch_nbytes(output), saved, peak, output, i_ms, w_ms,
                       saved_in, saved_out, held_w, held_w_in)


def _time_split(step: _Step, timer: Clock, flush: _Flusher, warmup: int, repeat: int,
                name: str) -> tuple[float, float]:
    """Median (I, W) ms: the forward under ``deferring`` (untimed), then the backward (I) and
    the store's deferred weight gradients (W; 0.0 where nothing was deferred), each after a
    flush, as W runs later in a zero-bubble step, after other work."""
    i_ms: list[float] = []
    w_ms: list[float] = []
    for r in range(warmup + repeat):
        flush()
        xin, wrt = step.inputs()
        store = WeightGrads()
        with deferring(store):
            outs = step.differentiable(as_batch(step.module(xin), name))
        flush()
        grads = [torch.ones_like(t) for t in outs]
        t0 = timer.mark()
        if outs and wrt:  # every leaf: a deferred weight is not one, and inputs=[its
            torch.autograd.backward(outs, grads)  # parameters] would skip the deferral
        t1 = timer.mark()
        deferred = len(store) > 0
        flush()
        t2 = timer.mark()
        store.run()
        t3 = timer.mark()
        i, _, w = timer.elapsed_ms([t0, t1, t2, t3])
        if r >= warmup:
            i_ms.append(i if outs and wrt else 0.0)
            w_ms.append(w if deferred else 0.0)
        del outs, grads, xin, wrt
    return statistics.median(i_ms), statistics.median(w_ms)


@contextmanager
def _restoring(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> Iterator[None]:
    try:
        yield
    finally:
        for p, g in zip(params, grads, strict=True):
            p.grad = g


def as_batch(out: object, name: str) -> Batch:
    ts = as_tensors(out, f"the output of layer {name}")
    return ts[0] if isinstance(out, Tensor) else ts


def _saved_bytes(step: _Step, name: str) -> tuple[int, int, int, Batch]:
    """Bytes of the unique storages autograd saves for backward, parameters and buffers (a
    BatchNorm's running statistics: the module's state, shared by every micro-batch)
    excluded, as the executor counts them (``memory.ActivationMeter``), and of those the parts
    that are the input's and the output's storages; also returns the output (detached)."""
    meter = ActivationMeter(step.module)
    meter.begin_step()
    xin, _ = step.inputs()
    with meter.saving() as seen:
        out = as_batch(step.module(xin), name)
    outs = as_tensors(out, "output")
    detached = like(out, [t.detach() for t in outs])

    def part(tensors: Sequence[Tensor]) -> int:
        return sum(size for ptr, size in seen.items() if ptr in meter.storages(tensors))
    return (sum(seen.values()), part(as_tensors(xin, "input")), part(outs), detached)


def _held_for_w(step: _Step, name: str) -> tuple[int, int]:
    """Bytes of the unique storages a split backward keeps from I until W (``WeightGrads``:
    each deferred linear's input and output gradient; parameters and buffers excluded, as the
    executor counts them), and of those the input's."""
    meter = ActivationMeter(step.module)
    meter.begin_step()
    xin, wrt = step.inputs()
    store = WeightGrads()
    with deferring(store):
        outs = step.differentiable(as_batch(step.module(xin), name))
    if outs and wrt:  # every leaf, as in _time_split
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
    held = meter.storages(store.tensors())
    own = meter.storages(as_tensors(xin, "input"))
    store.clear()
    return sum(held.values()), sum(size for ptr, size in held.items() if ptr in own)


def loss_bytes(loss_fn: Callable[[Any, Any], Tensor], output: Any,
               target: Any) -> tuple[int, int, int]:
    """What ``loss_fn(output, target)`` keeps for backward: the unique storages it saves (the
    targets' excluded), those of them that are ``output``'s, and the targets' bytes.

        >>> loss_bytes(torch.nn.functional.mse_loss, torch.zeros(4, 2), torch.ones(4, 2))
        (32, 32, 32)
    """
    leaves, spec = tree_flatten(output)  # a tensor, a tuple, or a model's output object
    outs = [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, Tensor) else t
            for t in leaves]
    meter = ActivationMeter(nn.Module())
    meter.begin_step(target)  # the targets: their own bytes, never among the saved ones
    with torch.enable_grad(), meter.saving() as seen:
        loss_fn(tree_unflatten(outs, spec), target)
    own = meter.storages([t for t in outs if isinstance(t, Tensor)])
    return (sum(seen.values()), sum(v for k, v in seen.items() if k in own), meter.batch_bytes)


def _peak_bytes(step: _Step, name: str) -> int:
    """CUDA allocator peak of one forward+backward above what was allocated before it."""
    device = next(iter(as_tensors(step.x, "input"))).device
    torch.cuda.synchronize(device)
    xin, wrt = step.inputs()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    outs = step.differentiable(as_batch(step.module(xin), name))
    grads = [torch.ones_like(t) for t in outs]
    if outs and wrt:
        torch.autograd.grad(outs, wrt, grads, allow_unused=True)
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base)


class _Noop(nn.Module):
    """A layer with no work: a view, so it has a backward node but launches no kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return x.view_as(x)


def harness_overhead_ms(device: torch.device, *, clock: str = "wall", layers: int = 8,
                        repeat: int = 51, rounds: int = 5) -> tuple[float, float]:
    """Per-call (fwd, bwd) cost that timing a layer alone pays and the whole model does not.

    With ``t1`` the time of one no-op layer alone and ``tN`` that of ``N`` no-op layers in one
    ``nn.Sequential``: ``t1 = c + o`` and ``tN = N*c + o`` (one call, one backward engine run),
    so the overhead ``o = (N*t1 - tN) / (N - 1)``. Each of ``t1`` and ``tN`` is the smallest
    median over ``rounds``: other processes only ever add time, and ``t1`` counts ``N`` times.
    """
    x = torch.ones(1, device=device)
    one, many = _Noop(), nn.Sequential(*(_Noop() for _ in range(layers)))
    t1: list[Measurement] = []
    tn: list[Measurement] = []
    gc.collect()
    for _ in range(rounds):
        t1.append(measure(one, x, device, warmup=5, repeat=repeat, clock=clock, name="no-op"))
        tn.append(measure(many, x, device, warmup=5, repeat=repeat, clock=clock,
                          name="no-ops"))
    fwd = (layers * min(m.fwd_ms for m in t1) - min(m.fwd_ms for m in tn)) / (layers - 1)
    bwd = (layers * min(m.bwd_ms for m in t1) - min(m.bwd_ms for m in tn)) / (layers - 1)
    return max(0.0, fwd), max(0.0, bwd)


def timing_problems(warmup: int, repeat: int, threads: int | None, clock: str) -> list[str]:
    """Every problem with the profilers' timing options (empty: none).

        >>> timing_problems(0, 0, None, "wall")
        ['warmup=0 must be >= 0 and repeat=0 >= 1']
    """
    problems = []
    if warmup < 0 or repeat < 1:
        problems.append(f"warmup={warmup} must be >= 0 and repeat={repeat} >= 1")
    if threads is not None and threads < 1:
        problems.append(f"threads={threads} must be >= 1 (or None for torch's default)")
    if clock not in CLOCKS:
        problems.append(f"clock={clock!r} is not one of {', '.join(CLOCKS)}")
    elif clock == "thread" and (threads or torch.get_num_threads()) != 1:
        problems.append("clock='thread' counts only the calling thread's CPU time, so it needs "
                        "threads=1; pass threads=1 or use clock='wall'")
    return problems
