"""Count a model's layers on the meta device: the profiler's bytes and each pass's work, no data.

    >>> from executor.workloads.models import build_model
    >>> w = build_model("gpt-tiny", batch=2)
    >>> counts = count_layers(w.model, w.sample, [1, 2], loss=(w.loss_fn, w.target))
    >>> counts.layers[1].type, counts.layers[1].saved_bytes, counts.loss.saved_bytes
    ('Block', (132096, 264192), (32772.0, 65540.0))

For models too large for any machine, or profiles for hardware one does not have: every layer
runs its forward and backward on the meta device, where tensors have shapes and no memory, so
nothing is computed and nothing allocated, whatever the model's size. The byte figures are
those ``profile_model`` writes, counted as ``measure.measure`` counts them: the same harness
(a fresh input per pass, layer 0's not differentiated), the same ``memory.ActivationMeter``
(which tells meta storages apart by their storage objects, as meta tensors have no
addresses), ``loss_bytes`` itself for the loss; the tests hold them equal to a real profile.
They are read inside the passes that count each pass's work by the rules of
``executor.profiling.metaops`` (FLOPs, bytes moved, kernels): per layer and size, a forward,
its backward, and a forward under ``splitgrad.deferring`` with its I and W. Times are not
counted: they need a device, or a model of one.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from executor.profiling.measure import (
    as_batch,
    as_tensors,
    batch_nbytes,
    chain_problems,
    loss_bytes,
    prepare_batch,
    slice_batch,
)
from executor.profiling.metaops import ATTENTION, Watch, Work, attention_as, counting
from executor.runtime.batch import Batch, like
from executor.runtime.devices import parse_dtype
from executor.runtime.memory import ActivationMeter, Storages
from executor.runtime.splitgrad import WeightGrads, deferring
from partitioner.formats.profile_loss import LossProfile

__all__ = ["ATTENTION", "LayerCounts", "MetaCounts", "Work", "count_layers"]

META = torch.device("meta")
_NO_WORK = Work(0, 0, 0)


@dataclass(frozen=True)
class LayerCounts:
    """One layer, one figure per micro-batch size. Bytes as ``LayerProfile`` has them:
    ``in_bytes``/``out_bytes`` its input and output; ``saved_bytes`` the unique storages
    autograd saves for its backward (parameters and buffers excluded), of which
    ``saved_input_bytes`` are its input's and ``saved_output_bytes`` its output's;
    ``held_for_w_bytes`` what a split backward keeps from I until W (each deferred linear's
    input and output gradient), of which ``held_for_w_input_bytes`` is its input.
    ``peak_bytes`` is None (see there).

    Work per pass (``metaops.Work``): ``fwd``; ``bwd``, the fused backward as the profiler
    runs it (into the input's gradient, except for layer 0, and accumulating into the
    parameters' existing ``.grad``); ``bwd_input`` (I) and ``bwd_weight`` (W), the split
    backward of ``executor.runtime.splitgrad`` (W: the deferred linears' weight gradients,
    zero where none is deferred). A layer without a backward has zero work in all three.
    """

    name: str
    type: str
    param_bytes: int
    in_bytes: tuple[int, ...]
    out_bytes: tuple[int, ...]
    saved_bytes: tuple[int, ...]
    saved_input_bytes: tuple[int, ...]
    saved_output_bytes: tuple[int, ...]
    held_for_w_bytes: tuple[int, ...]
    held_for_w_input_bytes: tuple[int, ...]
    fwd: tuple[Work, ...]
    bwd: tuple[Work, ...]
    bwd_input: tuple[Work, ...]
    bwd_weight: tuple[Work, ...]

    @property
    def peak_bytes(self) -> None:
        """None: the transient peak of forward+backward, which the profiler reads from the CUDA
        allocator (with its rounding and caching) and the meta device does not have."""
        return None


@dataclass(frozen=True)
class MetaCounts:
    """A model's layers counted on the meta device at each micro-batch size.

        >>> with torch.device("meta"):
        ...     model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> counts = count_layers(model, torch.empty(16, 4, device="meta"), [1, 16])
        >>> counts.layers[0].fwd[1]          # addmm: 2*16*4*8 FLOPs; bias, x, W in, y out
        Work(flops=1024, moved_bytes=928, kernels=1)
        >>> counts.layers[1].saved_bytes     # the ReLU saves its output: 8 floats a sample
        (32, 512)

    ``dtype``: the parameters' and floating inputs' dtype counted in; ``attention``: how
    attention ran (``metaops.ATTENTION``); ``loss``: what the loss keeps on the last stage
    (``LossProfile``, as ``profile_model(loss=...)`` writes it), None without ``loss=``.
    """

    microbatch_sizes: tuple[int, ...]
    dtype: str
    attention: str
    layers: tuple[LayerCounts, ...]
    loss: LossProfile | None = None


def count_layers(
    model: nn.Sequential,
    sample: Batch,
    microbatch_sizes: Sequence[int],
    dtype: str | torch.dtype | None = None,
    *,
    loss: tuple[Callable[[Any, Any], Tensor], Any] | None = None,
    train: bool = True,
    attention: str = "cpu",
) -> MetaCounts:
    """Count every child of ``model`` at each micro-batch size (the first rows of ``sample``)
    on the meta device, each on a meta copy of it (parameters cast to ``dtype`` where given,
    floating inputs too), its input the output of the layer before, as ``profile_model`` does.

    ``model`` and ``sample`` may be on any device, the meta device included (a model built
    under ``with torch.device("meta"):`` needs no memory); they are not changed, and real
    weights are never copied. ``loss=(loss_fn, target)`` also counts what the loss keeps
    (a target of at least the largest size's rows); ``train`` counts in training mode;
    ``attention`` says which kernels ``scaled_dot_product_attention`` takes (``ATTENTION``).

    Where devices' kernels differ, the meta kernels mostly follow CUDA's: a bfloat16 or
    float16 LayerNorm keeps its mean and rstd in float32 (the CPU in the input's dtype: 4
    bytes a row less); attention alone follows ``attention``. A layer that cannot run on meta
    (an output shape that depends on values: ``.item()``, ``nonzero``, boolean indexing; an op
    without a meta kernel) is a ValueError naming the layer, the op and the fix.
    """
    seq, batch, sizes = _check(model, sample, microbatch_sizes, loss, attention)
    cast = parse_dtype(dtype)
    xs = {b: prepare_batch(slice_batch(batch, b), META, cast) for b in sizes}
    layers = []
    with torch.device(META), attention_as(attention):
        for i, (name, layer) in enumerate(seq.named_children()):
            twin = _meta_copy(layer, cast, train)
            rows = [_count(twin, xs[b], i, name, b) for b in sizes]
            layers.append(LayerCounts(
                name=name, type=type(layer).__name__, param_bytes=_param_bytes(twin),
                **{key: tuple(getattr(r, key) for r in rows) for key in _PER_SIZE}))
            xs = {b: r.output for b, r in zip(sizes, rows, strict=True)}
        lost = None if loss is None else _loss(loss, xs, sizes, cast)
    model_dtype = next((p.dtype for p in seq.parameters() if p.is_floating_point()),
                       torch.float32)
    return MetaCounts(tuple(sizes), str(cast or model_dtype).removeprefix("torch."), attention,
                      tuple(layers), lost)


def _check(model: object, sample: object, sizes: Sequence[int], loss: object,
           attention: str) -> tuple[nn.Sequential, Batch, list[int]]:
    """Validate at the boundary; collect every problem before raising."""
    model, tensors, problems, batch = chain_problems(model, sample, "count_layers")
    good = [b for b in sizes if isinstance(b, int) and not isinstance(b, bool) and b >= 1]
    if not sizes or len(good) != len(sizes):
        problems.append(f"micro-batch sizes {list(sizes)!r} must be whole numbers >= 1")
    need = max(good, default=0)
    if need > batch:
        problems.append(f"micro-batch size {need} is larger than the sample batch of "
                        f"{batch}; give a sample of at least {need} rows or drop it")
    if loss is not None:
        if not (isinstance(loss, tuple) and len(loss) == 2 and callable(loss[0])):
            problems.append(f"loss={loss!r} must be a pair (loss_fn, target)")
        else:
            target = as_tensors(loss[1], "the loss target")
            t_rows = min(t.shape[0] if t.dim() else 0 for t in target)
            if t_rows < need:
                problems.append(f"loss= has a target of {t_rows} rows, but the largest "
                                f"micro-batch size is {need}; give a target with at least "
                                f"that many rows (one per sample)")
    if attention not in ATTENTION:
        problems.append(f"attention={attention!r} is not one of {', '.join(ATTENTION)}")
    if problems:
        raise ValueError("cannot count the layers: " + "; ".join(problems))
    return model, (tensors[0] if isinstance(sample, Tensor) else tensors), sorted(set(good))


def _meta_copy(layer: nn.Module, dtype: torch.dtype | None, train: bool) -> nn.Module:
    """A copy of ``layer`` whose parameters and buffers are new meta tensors of the same shapes
    (the real ones are never copied), cast to ``dtype``, in the given mode."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(layer.parameters(), layer.buffers()):
        twin = torch.empty_like(t, device=META)
        memo[id(t)] = (nn.Parameter(twin, requires_grad=t.requires_grad)
                       if isinstance(t, nn.Parameter) else twin)
    copied = copy.deepcopy(layer, memo)
    if dtype is not None:  # floating parameters and buffers only, as Module.to casts
        copied.to(dtype=dtype)
    return copied.to(device=META).train(train)


def _param_bytes(module: nn.Module) -> int:
    unique = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in unique)


def _inputs(x: Batch, input_grad: bool) -> tuple[Batch, list[Tensor]]:
    """A fresh input and its leaves to differentiate, as ``measure``'s harness makes them."""
    leaves, fresh = [], []
    for t in as_tensors(x, "input"):
        if input_grad and t.is_floating_point():
            leaf = t.detach().requires_grad_(True)
            leaves.append(leaf)
            fresh.append(leaf.clone())
        else:
            fresh.append(t.clone())
    return like(x, fresh), leaves


@dataclass(frozen=True)
class _Row:
    """One layer at one size: ``LayerCounts``' figures, and its output (detached)."""

    in_bytes: int
    out_bytes: int
    saved_bytes: int
    saved_input_bytes: int
    saved_output_bytes: int
    held_for_w_bytes: int
    held_for_w_input_bytes: int
    fwd: Work
    bwd: Work
    bwd_input: Work
    bwd_weight: Work
    output: Batch


#: The fields of ``LayerCounts`` after its name, type and parameter bytes, in order.
_PER_SIZE = tuple(f for f in _Row.__dataclass_fields__ if f != "output")


def _count(layer: nn.Module, x: Batch, i: int, name: str, b: int) -> _Row:
    """``layer`` at input ``x``; a failure is a ValueError naming the layer, the op, the fix."""
    watch = Watch()
    try:
        return _passes(layer, x, i > 0, name, watch)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        raise ValueError(f"layer {i} ({name!r}, {type(layer).__name__}) cannot run on the meta "
                         f"device at micro-batch size {b}: {_why(exc, watch)}") from exc


#: Torch's words for an op whose output shape needs values, or that has no meta kernel.
_NEEDS_DATA = ("item()", "nonzero", "data-dependent", "data dependent", "no fake impl",
               "meta kernel", "Meta backend", "'Meta' backend")


def _why(exc: BaseException, watch: Watch) -> str:
    """The op that failed, torch's reason, and the fix."""
    op = watch.failed_op or "its forward or backward"
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if any(word in str(exc) for word in _NEEDS_DATA):
        fix = ("counting without data needs each op's output shape to follow from its "
               "inputs' shapes (not so for .item(), nonzero, boolean-mask indexing or a Python "
               "branch on a value) and a meta kernel for each op; make the layer shape-static "
               "(e.g. torch.where with a fixed-size mask instead of indexing by it), or wrap "
               "the data-dependent part in a leaf op that declares its output shape "
               "(torch.library.custom_op with register_fake)")
    elif "device" in reason:
        fix = ("the layer uses a tensor that is not on the input's device (a plain tensor "
               "attribute, or one made with an explicit device=): register it as a buffer, or "
               "make it on the input's device (device=x.device)")
    else:
        fix = ("it would fail on a real device too: check that the model runs on the sample "
               "(e.g. with profile_model on a few layers of it)")
    return f"{op} failed ({reason}); {fix}"


def _passes(layer: nn.Module, x: Batch, input_grad: bool, name: str, watch: Watch) -> _Row:
    """F, B, then a split forward with its I and W, each counted alone, with the bytes read
    on the way as ``measure`` reads them: what F saves (``_saved_bytes``) and what I leaves
    for W (``_held_for_w``). B, I and W accumulate into parameter gradients that exist, as
    every micro-batch after a step's first does; the input's gradient is passed on, as inside
    a whole model's backward (its accumulation into the harness's input leaf is not counted).
    """
    params = [p for p in layer.parameters() if p.requires_grad]
    meter = ActivationMeter(layer)
    meter.begin_step()  # parameters and buffers never count
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        with torch.enable_grad():
            xin, leaves = _inputs(x, input_grad)
            with counting(watch) as fwd, meter.saving() as seen:
                out = as_batch(layer(xin), name)
            outs = [t for t in as_tensors(out, "output") if t.requires_grad]
            output = like(out, [t.detach() for t in as_tensors(out, "output")])
            saved = (sum(seen.values()), _part(seen, meter.storages(as_tensors(xin, "input"))),
                     _part(seen, meter.storages(as_tensors(out, "output"))))
            del out, seen
            works, held = [fwd.work(), _NO_WORK, _NO_WORK, _NO_WORK], (0, 0)
            if outs and (leaves or params):
                grads = [torch.ones_like(t) for t in outs]
                with counting(watch) as bwd, bwd.skipping_leaf_grads(leaves):
                    torch.autograd.backward(outs, grads, inputs=[*leaves, *params])
                del outs
                xin, leaves = _inputs(x, input_grad)
                store = WeightGrads()
                with deferring(store):
                    outs = [t for t in as_tensors(as_batch(layer(xin), name), "output")
                            if t.requires_grad]
                with counting(watch) as i_pass, i_pass.skipping_leaf_grads(leaves):
                    torch.autograd.backward(outs, grads)  # every leaf, as measure's split does
                kept = meter.storages(store.tensors())
                held = (sum(kept.values()),
                        _part(kept, meter.storages(as_tensors(xin, "input"))))
                with counting(watch) as w_pass:
                    store.run()
                works[1:] = [bwd.work(), i_pass.work(), w_pass.work()]
    finally:
        for p in params:
            p.grad = None
    return _Row(batch_nbytes(x), batch_nbytes(output), *saved, *held, fwd=works[0],
                bwd=works[1], bwd_input=works[2], bwd_weight=works[3], output=output)


def _part(storages: Storages, of: Storages) -> int:
    """Bytes of ``storages`` that are among ``of``."""
    return sum(size for key, size in storages.items() if key in of)


def _loss(loss: tuple[Callable[[Any, Any], Tensor], Any], outputs: dict[int, Batch],
          sizes: list[int], cast: torch.dtype | None) -> LossProfile:
    """What the loss keeps at each size, by the profiler's ``loss_bytes``."""
    loss_fn, target = loss
    watch = Watch()
    try:
        with counting(watch):
            rows = [loss_bytes(loss_fn, outputs[b],
                               prepare_batch(slice_batch(target, b), META, cast)) for b in sizes]
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        raise ValueError(f"the loss cannot run on the meta device: {_why(exc, watch)}") from exc
    return LossProfile(*(tuple(float(r[j]) for r in rows) for j in range(3)))
