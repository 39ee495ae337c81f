"""What one pass on the meta device costs: the FLOPs, bytes moved and kernels of its aten ops.

    >>> import torch
    >>> x, w = torch.empty(8, 4, device="meta"), torch.empty(3, 4, device="meta")
    >>> with counting(Watch()) as tally:
    ...     y = torch.nn.functional.linear(x, w).relu()
    >>> tally.work()   # mm: 2*8*4*3 FLOPs, reads 32+12 floats, writes 24; relu: 24 in, 24 out
    Work(flops=192, moved_bytes=464, kernels=2)

The rules, applied to every aten op a pass dispatches (after composite ops such as ``linear``
or ``matmul`` have decomposed, so ``x.t()`` then ``mm``), forward or backward alike:

* ``kernels``: the ops that would launch a kernel on a device. Not counted: views (the op's
  schema says its output aliases an input: ``view``, ``transpose``, ``expand``, ``detach``,
  ``split``, ...), ops that make or relabel tensors without touching their elements
  (``_NO_KERNEL``: ``empty``-like allocations, ``_unsafe_view``, ``set_``, metadata queries),
  and ops whose every tensor, in and out, is empty.
* ``moved_bytes``: over those kernels, the bytes (``numel * element_size``) of every tensor
  among the op's arguments and of every tensor it returns; an in-place op's tensor counts as
  read and as written. No cache is modelled: what one op writes and the next reads counts twice.
* ``flops``: over those kernels, ``torch.utils.flop_counter.FlopCounterMode``'s formulas
  (matmuls, convolutions, attention, a causal one counted whole; pointwise ops and
  reductions count 0), called as it calls them, with the CPU's flash attention kernels counted as their CUDA twins are
  (FlopCounterMode has no formula of its own for them: ``CPU_FLASH_FLOPS`` gives it one).

``Watch`` remembers the op that last raised, so that a layer that cannot run on meta is
reported with the op to blame. ``attention_as`` makes ``scaled_dot_product_attention`` on meta
take the kernels a CPU would (on meta, torch itself always takes the unfused math path).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["ATTENTION", "CPU_FLASH_FLOPS", "Tally", "Watch", "Work", "attention_as", "counting"]

aten = torch.ops.aten

#: Ops that launch no kernel although their schema does not say they are views.
_NO_KERNEL = frozenset({
    aten._unsafe_view.default, aten.empty.memory_format, aten.empty_strided.default,
    aten.empty_like.default, aten.new_empty.default, aten.new_empty_strided.default,
    aten.lift_fresh.default, aten.set_.source_Storage_storage_offset, aten.set_.source_Tensor,
    aten.resize_.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    aten.sym_storage_offset.default, aten.is_same_size.default, aten._local_scalar_dense.default,
    aten._fused_sdp_choice.default,  # which attention kernel: a question, not work
})


@dataclass(frozen=True)
class Work:
    """The work of one pass: FLOPs, bytes its kernels read and write, and its kernels; ``ops``
    the (FLOPs, moved bytes, 1 for a convolution else 0) of each kernel, in order (what a
    roofline per kernel needs: convolutions run far from the matrix products' rate)."""

    flops: int
    moved_bytes: int
    kernels: int
    ops: tuple[tuple[int, int, int], ...] = field(default=(), repr=False, compare=False)
    views: int = field(default=0, repr=False, compare=False)  # ops dispatched, no kernel


class Watch:
    """The op that last raised in a pass (None when the last op dispatched did not raise)."""

    def __init__(self) -> None:
        self.failed_op: str | None = None


def _nbytes(objs: Any) -> tuple[int, int]:
    """(bytes, elements) of the tensors among ``objs`` (nested lists, tuples, dicts)."""
    ts = [t for t in tree_leaves(objs) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in ts), sum(t.numel() for t in ts)


class Tally(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's own, untyped
    """Counts the FLOPs, kernels and moved bytes of the ops dispatched inside it (the module's
    rules), and tells ``watch`` which op raised."""

    def __init__(self, watch: Watch) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.watch = watch
        self.flops = 0
        self.kernels = 0
        self.moved_bytes = 0
        self.ops: list[tuple[int, int, int]] = []
        self.views = 0
        self.paused = False  # while True, ops run uncounted (a harness's own work)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except Exception:
            self.watch.failed_op = str(func)
            raise
        self.watch.failed_op = None
        if self.paused:
            return out
        if func.is_view or func in _NO_KERNEL:
            self.views += 1
            return out
        in_bytes, in_numel = _nbytes((args, kwargs))
        out_bytes, out_numel = _nbytes(out)
        if in_numel or out_numel:
            self.kernels += 1
            self.moved_bytes += in_bytes + out_bytes
            formula = _FLOP_FORMULAS.get(func._overloadpacket)
            flops = 0
            if formula is not None:  # as FlopCounterMode calls its formulas
                flops = int(formula(*args, **kwargs, out_val=out))
                self.flops += flops
            conv = int("convolution" in func._overloadpacket.__name__)
            self.ops.append((flops, in_bytes + out_bytes, conv))
        return out

    @contextmanager
    def skipping_leaf_grads(self, leaves: Sequence[torch.Tensor]) -> Iterator[None]:
        """Inside the block, a backward's accumulation into ``leaves``' ``.grad`` goes uncounted
        (with its FLOPs: none): the harness's, not the layer's, which passes its input's
        gradient on (a layer that passes its output gradient through unchanged would
        otherwise count the copy that accumulating a gradient held elsewhere makes)."""
        def pause(_: torch.Tensor) -> None:
            self.paused = True

        def resume(_: torch.Tensor) -> None:
            self.paused = False
        handles = []
        for leaf in leaves:  # the leaf's hooks run just before and just after its accumulation
            handles.append(leaf.register_hook(pause))  # type: ignore[no-untyped-call]
            handles.append(leaf.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                resume))
        try:
            yield
        finally:
            self.paused = False
            for h in handles:
                h.remove()

    def work(self) -> Work:
        return Work(self.flops, self.moved_bytes, self.kernels, tuple(self.ops), self.views)


def _cpu_flash_flop(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                    out_val: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``_scaled_dot_product_flash_attention_for_cpu``: those of CUDA's flash kernel."""
    return int(sdpa_flop_count(  # type: ignore[no-untyped-call]
        query.shape, key.shape, value.shape))


def _cpu_flash_backward_flop(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, *args: Any, out_val: Any = None,
                             **kwargs: Any) -> int:
    """FLOPs of its backward: those of CUDA's flash backward (which recomputes the scores)."""
    return int(sdpa_backward_flop_count(  # type: ignore[no-untyped-call]
        grad_out.shape, query.shape, key.shape, value.shape))


for _formula in (_cpu_flash_flop, _cpu_flash_backward_flop):
    vars(_formula)["_get_raw"] = True  # FlopCounterMode's flag: call it with the tensors

#: FlopCounterMode(custom_mapping=CPU_FLASH_FLOPS) counts the CPU's flash attention as CUDA's.
CPU_FLASH_FLOPS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flop,
}
_FLOP_FORMULAS: dict[Any, Callable[..., Any]] = {**flop_registry, **CPU_FLASH_FLOPS}


@contextmanager
def counting(watch: Watch) -> Iterator[Tally]:
    """Count the ops run inside the block: ``tally.work()`` after it."""
    tally = Tally(watch)
    with tally:
        yield tally


# -- attention as a CPU runs it ----------------------------------------------------------------

#: How ``scaled_dot_product_attention`` runs on meta: "cpu" takes the kernels a CPU would (its
#: fused flash kernel where the CPU's own choice takes it, else the math path), "math" always
#: the unfused math path (torch's own choice on meta).
ATTENTION = ("cpu", "math")


def _cpu_twin(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with ``t``'s shape, dtype, last-dim stride and requires_grad, on a storage of
    one row (the other strides 0): what the CPU's choice of attention kernel reads of ``t``."""
    step = t.stride(-1) if t.dim() else 1
    rows = max(1, (t.shape[-1] - 1) * step + 1) if t.dim() else 1
    base = torch.empty(rows, dtype=t.dtype, device="cpu")
    twin = base.as_strided(t.shape, (0,) * max(0, t.dim() - 1) + ((step,) if t.dim() else ()))
    return twin.detach().requires_grad_(t.requires_grad and t.is_floating_point())


def _cpu_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> torch.Tensor | None:
    """SDPA on meta as the CPU runs it when the CPU takes its flash kernel (the op sequence of
    torch's CPU path: a boolean mask becomes an additive one); None where it takes math."""
    if not query.is_meta:
        return None
    mask = None if attn_mask is None else _cpu_twin(attn_mask)
    choice = aten._fused_sdp_choice.default(
        _cpu_twin(query), _cpu_twin(key), _cpu_twin(value), mask, dropout_p, is_causal,
        scale=scale, enable_gqa=enable_gqa)
    if choice != SDPBackend.FLASH_ATTENTION.value:
        return None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.where(
            attn_mask, torch.scalar_tensor(0.0, dtype=query.dtype, device=attn_mask.device),
            torch.scalar_tensor(-math.inf, dtype=query.dtype, device=attn_mask.device))
    out: torch.Tensor = aten._scaled_dot_product_flash_attention_for_cpu.default(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    return out


class _Attention(TorchFunctionMode):
    def __torch_function__(self, func: Callable[..., Any], types: Any,
                           args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            try:
                out = _cpu_attention(*args, **kwargs)
            except TypeError:  # arguments it does not know: torch's own call says what is wrong
                out = None
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextmanager
def attention_as(backend: str) -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` on meta tensors inside the block as ``backend``
    (one of ``ATTENTION``) would."""
    if backend not in ATTENTION:
        raise ValueError(f"attention={backend!r} is not one of {', '.join(ATTENTION)}")
    if backend == "math":
        yield
        return
    with _Attention():
        yield
