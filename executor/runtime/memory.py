"""Activation memory as a stage holds it: per micro-batch, what it saved for backward and stashed.

    >>> import torch
    >>> layer = torch.nn.Linear(4, 4)
    >>> meter = ActivationMeter(layer); meter.begin_step()
    >>> x = torch.ones(8, 4)                       # 128 bytes
    >>> with meter.saving() as saved:
    ...     y = torch.relu(layer(x))               # the linear saves x, relu its output
    >>> meter.hold(0, saved, meter.storages(x))    # x counted once: 128 + 128
    256
    >>> meter.release(0), meter.live_bytes, meter.peak_bytes
    (256, 0, 256)

What counts: the storages of the tensors autograd saves for a micro-batch's backward (through
``torch.autograd.graph.saved_tensors_hooks``; parameters and buffers, such as a BatchNorm's
running statistics, excluded; a storage once however many views of it are saved, and once
however many micro-batches hold it), together with the stage's stashed input, from the end of
its F to the end of its B. A re-materialising stage holds only the stash and, while B (or I)
rebuilds the forward, the rebuilt storages on top; a split backward's micro-batch holds, from
I to W, what the deferred weight gradients keep (``splitgrad.WeightGrads``: each deferred
linear's input and output gradient). The first stage holds the step's inputs, and the last
its targets, from the step's start to its end (their tensors' bytes, once). The peak is the
most held at once in the step: the measured counterpart of the simulator's replayed
activation peak (``SimResult.stage_activation_peak_bytes``). Transient tensors (a backward's
gradients, a forward's intermediates that are not saved) and the allocator's caching are not
in it; on CUDA the distributed runner also reports ``torch.cuda.max_memory_allocated``, which
includes them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

__all__ = ["ActivationMeter", "Storages"]

#: Storages by address: their size in bytes.
Storages = dict[int, int]


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the memory ``t`` keeps alive: its whole storage (a view keeps all of
    it); a tensor without one (sparse, nested) counts its own elements at its own id. A meta
    tensor's storage has no memory (its address is 0 for all): it is told apart by the
    address of its storage object instead, which views share and which is unique while the
    storage lives (``executor.profiling.meta`` counts on this)."""
    try:
        storage = t.untyped_storage()
        key = storage._cdata if storage.device.type == "meta" else storage.data_ptr()
        return key, storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), t.numel() * t.element_size()


class ActivationMeter:
    """Counts what one stage holds for backward in a step, micro-batch by micro-batch (see the
    module docstring); the parameters and buffers of ``module`` (the stage's: its state, read
    at each step's start, so weights loaded or moved later are known) never count."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._skip: set[int] = set()
        self._held: dict[int, Storages] = {}  # per micro-batch, what it holds
        self._count: dict[int, int] = {}  # per storage, the micro-batches holding it
        self.batch_bytes = self.live_bytes = self.peak_bytes = 0

    def begin_step(self, batch: Any = None) -> None:
        """Start a step: nothing held but ``batch`` (the step's inputs on the first stage, its
        targets on the last: tensors in any nesting), which counts its tensors' own bytes for
        the whole step (a batch may be a view of a larger dataset tensor) and whose storages
        do not count again when saved."""
        tensors = [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]
        self._skip = {_storage(p)[0] for p in itertools.chain(self.module.parameters(),
                                                               self.module.buffers())}
        self._skip |= {_storage(t)[0] for t in tensors}
        self._held = {}
        self._count = {}
        self.batch_bytes = sum(t.numel() * t.element_size() for t in tensors)
        self.live_bytes = self.peak_bytes = self.batch_bytes

    def storages(self, obj: Any) -> Storages:
        """The storages of the tensors in ``obj`` (a tensor, or nested tuples, lists and dicts
        of them), parameters and the batch excluded."""
        out: Storages = {}
        for leaf in tree_leaves(obj):
            if isinstance(leaf, torch.Tensor):
                ptr, size = _storage(leaf)
                if ptr not in self._skip:
                    out[ptr] = max(out.get(ptr, 0), size)
        return out

    @contextmanager
    def saving(self) -> Iterator[Storages]:
        """Collect the storages autograd saves for backward inside the block (tensors are saved
        as they are: nothing is copied or moved)."""
        seen: Storages = {}
        skip = self._skip

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr, size = _storage(t)
            if ptr not in skip and seen.get(ptr, -1) < size:
                seen[ptr] = size
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield seen

    def hold(self, microbatch: int, *parts: Storages) -> int:
        """Micro-batch ``microbatch`` now holds the union of ``parts`` (replacing what it held
        before, as after I it holds W's work instead of its graph); returns the bytes held. A
        storage that several micro-batches hold (views of one batch) counts once."""
        merged: Storages = {}
        for part in parts:
            merged.update(part)
        self.release(microbatch)
        self._held[microbatch] = merged
        count = self._count
        for ptr, size in merged.items():
            held = count.get(ptr, 0)
            if not held:
                self.live_bytes += size
            count[ptr] = held + 1
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return sum(merged.values())

    def rebuild(self, microbatch: int, rebuilt: Storages) -> int:
        """A re-materialisation of ``microbatch`` rebuilt ``rebuilt`` on top of what is held:
        counts towards the peak now (they go with the backward that consumes them); returns
        the bytes it added."""
        extra = sum(size for ptr, size in rebuilt.items() if ptr not in self._count)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes + extra)
        return extra

    def release(self, microbatch: int) -> int:
        """Micro-batch ``microbatch`` holds nothing any more; returns the bytes this freed."""
        freed, count = 0, self._count
        for ptr, size in self._held.pop(microbatch, {}).items():
            held = count[ptr] - 1
            if held:
                count[ptr] = held
            else:
                del count[ptr]
                freed += size
        self.live_bytes -= freed
        return freed


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
