"""Split backward for zero-bubble pipelines: linear layers' weight gradients wait from I until W.

    >>> import torch
    >>> layer, store = torch.nn.Linear(3, 2), WeightGrads()
    >>> with deferring(store):
    ...     loss = layer(torch.ones(4, 3)).sum()
    >>> loss.backward()                                   # I: input gradients only
    >>> layer.weight.grad is None, len(store)
    (True, 1)
    >>> store.run(), len(store), layer.weight.grad.tolist()  # W: 1 linear, now accumulated
    (1, 0, [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]])

Zero-bubble schedules split a stage's backward B of micro-batch i into I (the input gradient,
sent upstream at once) and W (the weight gradient, run later to fill a bubble)::

    F  under deferring(store)   a deferred linear y = x W^T + b saves x, as a plain one does
    I  loss.backward() etc.     computes only dL/dx = dL/dy W; records (x, dL/dy) in store   (1)
    W  store.run()              dL/dW = dL/dy^T x, dL/db = sum dL/dy, accumulated into .grad (2)

Memory: between I (1) and W (2) micro-batch i keeps, for each deferred linear, its input x and its
output gradient dL/dy (``WeightGrads.nbytes``), but no autograd graph: I frees it as usual.

What is deferred: while grad mode is on, a call whose weight is a leaf tensor that requires a
gradient (a parameter, not a computed weight), whose bias is None or a 1-D leaf, all plain
tensors or parameters (no subclasses), of

* ``torch.nn.functional.linear(x, weight, bias)``: ``nn.Linear``, and so fx-traced modules
  (``torch.fx.symbolic_trace`` keeps ``nn.Linear`` as a module call) and any leading dims of x;
* ``torch.ops.aten.linear.default``: the graph of ``torch.export.export(...).module()``;
* ``torch.addmm(bias, x, weight)`` with 2-D x and ``alpha = beta = 1`` (and
  ``aten.addmm.default``): Transformers' ``Conv1D`` (GPT-2), where y = x W + b.

Everything else gets its weight gradient during I as usual, which is still correct:
convolutions, embeddings, LayerNorm/BatchNorm affine parameters, ``matmul``/``mm``/``einsum`` with
a parameter, weights computed from parameters (parametrizations, ``weight.t()``), and the
``addmm(b, x, permute(W))`` of an export graph after ``run_decompositions()``.

W accumulates through autograd (``torch.autograd.backward`` on the parameters), so ``.grad``
is summed exactly as a full backward would, and tensor hooks and post-accumulate-grad hooks on a
deferred parameter fire in W, not in I. Under autocast, I and W compute in the output
gradient's dtype and cast back, as autocast's backward does.

Caveats: a deferred parameter is not in I's autograd graph (``torch.autograd.grad(loss, W)``
does not see it); a backward with ``create_graph=True`` through a deferred linear is an error;
``torch.utils.checkpoint`` inside the block fails, as its recomputation runs outside it (rerun
the forward under ``deferring`` instead, as re-materialisation does); while the block is active
every torch call of the forward passes through one Python function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["WeightGrads", "deferring"]


class _Deferred(NamedTuple):
    """One deferred linear's W (2): y = x W^T + b (``transposed``: y = x W + b, addmm)."""

    weight: Tensor
    bias: Tensor | None
    x: Tensor  # the forward's input, detached, (..., in)
    grad_out: Tensor  # dL/dy, detached, (..., out)
    transposed: bool


class WeightGrads:
    """The deferred weight-gradient work of one micro-batch on one stage: filled by I, emptied by
    ``run`` (W). ``len(store)`` is the number of deferred linears waiting for W, so a store still
    non-empty at the end of a step is a W that never ran, and ``run`` returning 0 is a W with
    nothing to do (run twice, or before I)."""

    def __init__(self) -> None:
        self._pending: list[_Deferred] = []

    def __len__(self) -> int:
        return len(self._pending)

    def __repr__(self) -> str:
        return f"WeightGrads(pending={len(self)}, nbytes={self.nbytes})"

    @property
    def nbytes(self) -> int:
        """Bytes of the inputs and output gradients held for W."""
        return sum(t.numel() * t.element_size() for d in self._pending for t in (d.x, d.grad_out))

    def tensors(self) -> list[Tensor]:
        """The inputs and output gradients held for W."""
        return [t for d in self._pending for t in (d.x, d.grad_out)]

    def _record(self, work: _Deferred) -> None:
        self._pending.append(work)

    def clear(self) -> None:
        """Drop the waiting work without applying it (an aborted step)."""
        self._pending = []

    def run(self) -> int:
        """W: compute the deferred weight and bias gradients and accumulate them into ``.grad``
        as a full backward would; returns the number of deferred linears applied."""
        pending, self._pending = self._pending, []
        count = len(pending)
        grads: dict[int, tuple[Tensor, Tensor]] = {}  # id(param) -> (param, summed gradient)

        def add(param: Tensor, grad: Tensor) -> None:
            grad = grad.to(param.dtype)
            seen = grads.get(id(param))
            grads[id(param)] = (param, grad if seen is None else seen[1] + grad)

        with torch.no_grad():
            while pending:  # pop as we go: each (x, dL/dy) is freed once used
                d = pending.pop()
                g = d.grad_out.reshape(-1, d.grad_out.shape[-1])  # (N, out)
                x = d.x.reshape(-1, d.x.shape[-1]).to(g.dtype)  # (N, in)
                add(d.weight, x.T @ g if d.transposed else g.T @ x)
                if d.bias is not None:
                    add(d.bias, g.sum(0))
                del d, g, x
        if grads:  # through AccumulateGrad: .grad summed, hooks fired, as by a full backward
            params, summed = zip(*grads.values(), strict=True)
            torch.autograd.backward(list(params), list(summed))
        return count


class _DeferredLinear(torch.autograd.Function):
    """y = x W^T + b (``transposed``: y = x W + b) whose backward is I (1) only: it returns
    dL/dx and records W's work in the store chosen at forward time.

    The parameters come in a tuple, which autograd does not look into, so the graph has no edge
    to them and I leaves them alone (no AccumulateGrad, no hooks called with None). Where x
    needs no gradient, ``anchor`` (an empty leaf) makes y need one, so that I reaches here."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, anchor: Tensor | None, store: WeightGrads,
                params: tuple[Tensor, Tensor | None], transposed: bool) -> Tensor:
        weight, bias = params
        ctx.save_for_backward(x, weight.detach())  # the detached W shares the version counter
        ctx.params, ctx.store, ctx.transposed = params, store, transposed
        if transposed:
            assert bias is not None  # addmm always has one (_deferrable)
            return torch.addmm(bias, x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        if torch.is_grad_enabled():
            raise RuntimeError("a backward with create_graph=True went through a linear whose "
                               "weight gradient is deferred (splitgrad.deferring); double "
                               "backward needs the weight gradient in the graph: run that "
                               "forward outside deferring()")
        x, w = ctx.saved_tensors
        weight, bias = ctx.params
        ctx.store._record(_Deferred(weight, bias if bias is not None and bias.requires_grad
                                    else None, x.detach(), grad_out.detach(), ctx.transposed))
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        w = w.to(grad_out.dtype)  # autocast: the dtype the forward computed in
        grad_x = grad_out @ (w.T if ctx.transposed else w)
        return grad_x.to(x.dtype), None, None, None, None


_PLAIN = (Tensor, nn.Parameter)


def _leaf(t: Any) -> bool:
    """A plain tensor or parameter made by no op: its gradient can be accumulated in W."""
    return type(t) in _PLAIN and bool(t.is_leaf)


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...],
          extra: dict[str, Any]) -> list[Any] | None:
    """The arguments ``names`` by position or keyword; None if other arguments are given or an
    ``extra`` one differs from its default (``addmm``'s ``beta``, ``alpha``)."""
    if len(args) > len(names) or set(kwargs) - {*names, *extra}:
        return None
    if any(kwargs.get(k, v) != v for k, v in extra.items()):
        return None
    return [*args, *(kwargs.get(n) for n in names[len(args):])]


def _deferrable(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[Tensor, Tensor, Tensor | None, bool] | None:
    """(x, weight, bias, transposed) when the call is one ``deferring`` replaces, else None."""
    transposed = func in _ADDMM
    if transposed:  # addmm(bias, x, W): y = x W + b
        bound = _bind(args, kwargs, ("input", "mat1", "mat2"), {"beta": 1, "alpha": 1})
        if bound is None or bound[0] is None:
            return None
        bias, x, weight = bound
    elif func in _LINEAR:  # linear(x, W, bias): y = x W^T + b
        bound = _bind(args, kwargs, ("input", "weight", "bias"), {})
        if bound is None:
            return None
        x, weight, bias = bound
    else:
        return None
    if not (_leaf(weight) and weight.requires_grad and weight.dim() == 2 and type(x) in _PLAIN):
        return None
    if transposed and x.dim() != 2:
        return None
    if bias is not None and not (_leaf(bias) and bias.dim() == 1):
        return None
    return x, weight, bias, transposed


_LINEAR = (F.linear, torch.ops.aten.linear.default)
_ADDMM = (torch.addmm, torch.ops.aten.addmm.default)


class _Deferring(TorchFunctionMode):
    def __init__(self, store: WeightGrads) -> None:
        super().__init__()
        self.store = store

    def __torch_function__(self, func: Callable[..., Any], types: Any,
                           args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                           ) -> Any:
        kwargs = kwargs or {}
        call = _deferrable(func, args, kwargs) if torch.is_grad_enabled() else None
        if call is None:
            return func(*args, **kwargs)
        return _apply(self.store, call)


def _apply(store: WeightGrads, call: tuple[Tensor, Tensor, Tensor | None, bool]) -> Tensor:
    x, weight, bias, transposed = call
    anchor = None if x.requires_grad else torch.empty(0, device=x.device, requires_grad=True)
    return _DeferredLinear.apply(  # type: ignore[no-any-return, no-untyped-call]
        x, anchor, store, (weight, bias), transposed)


def _is_conv1d(m: nn.Module) -> bool:
    """Transformers' ``Conv1D`` (GPT-2): y = addmm(b, x.view(-1, in), W).view(..., nf)."""
    return (type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int)
            and isinstance(getattr(m, "weight", None), Tensor))


def _swappable(m: nn.Module) -> bool:
    """A module whose own forward is the linear itself: ``nn.Linear`` (or a subclass keeping
    its forward) or ``Conv1D``, with no forward of its own set on the instance."""
    return "forward" not in vars(m) and (type(m).forward is nn.Linear.forward or _is_conv1d(m))


def _covered(root: nn.Module) -> bool:
    """Whether every matrix parameter under ``root`` is a swappable module's own weight or an
    embedding's (which no linear of a forward takes): then swapping the modules' forwards
    defers all a ``_Deferring`` mode would, short of a functional linear on a module's
    weight written elsewhere (e.g. a head tied to an embedding through ``F.linear``)."""
    for m in root.modules():
        for name, p in m.named_parameters(recurse=False):
            if p.dim() != 2 or not p.requires_grad:
                continue
            if not ((name == "weight" and _swappable(m)) or isinstance(m, nn.Embedding)):
                return False
    return True


def _swapped_forward(m: nn.Module, store: WeightGrads) -> Callable[[Tensor], Tensor]:
    plain: Callable[[Tensor], Tensor] = type(m).forward.__get__(m)
    conv1d = _is_conv1d(m)
    nf: int = getattr(m, "nf", 0)

    def forward(x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return plain(x)
        if conv1d:  # as Conv1D.forward, its addmm deferred
            call = _deferrable(torch.addmm, (m.bias, x.view(-1, x.size(-1)), m.weight), {})
            if call is None:
                return plain(x)
            return _apply(store, call).view(*x.shape[:-1], nf)
        call = _deferrable(F.linear, (x, m.weight, m.bias), {})
        return plain(x) if call is None else _apply(store, call)
    return forward


@contextmanager
def _swapping(root: nn.Module, store: WeightGrads) -> Iterator[WeightGrads]:
    swapped = [m for m in root.modules() if _swappable(m)]
    try:
        for m in swapped:
            m.forward = _swapped_forward(m, store)
        yield store
    finally:
        for m in swapped:
            vars(m).pop("forward", None)


@contextmanager
def deferring(store: WeightGrads, modules: nn.Module | None = None) -> Iterator[WeightGrads]:
    """Run a stage's forward (or its re-materialisation inside I) so that the backward of every
    deferrable linear in it (see the module docstring) leaves its weight gradient in ``store``
    for ``store.run()``. Outside the block torch is untouched.

    ``modules``, the forward's own modules, allows the fast way where every matrix parameter
    in them is an ``nn.Linear``'s or ``Conv1D``'s weight (or an embedding's): those modules'
    forwards are swapped for the block, and no other torch call is intercepted (the mode costs
    each call of the forward a Python function: measured 4-26% of a GPT block's forward on this
    project's CPU, the more the smaller the micro-batch). Otherwise, and without ``modules``,
    every torch call passes through the mode."""
    if not isinstance(store, WeightGrads):
        raise TypeError(f"deferring() needs the micro-batch's WeightGrads store, got "
                        f"{type(store).__name__}; create one with WeightGrads()")
    if modules is not None and _covered(modules):
        with _swapping(modules, store):
            yield store
        return
    with _Deferring(store):
        yield store
