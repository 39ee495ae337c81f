"""What a chain stage holds for backward per micro-batch, from its layers' saved bytes.

    >>> import numpy as np
    >>> t = activation_terms(saved=np.array([8., 8., 8.]), saved_in=np.array([4., 4., 4.]),
    ...                      saved_out=np.array([4., 4., 0.]), in_bytes=np.array([4., 4., 4.]))
    >>> t.exact, t.act.tolist(), t.lead.tolist(), t.keep.tolist(), t.stash.tolist()
    (True, [8.0, 4.0, 4.0], [4.0, 0.0, 0.0], [-4.0, 4.0, 4.0], [0.0, 4.0, 4.0])
    >>> t.held(0, 3, recompute=False), t.held(1, 3, recompute=False)   # per micro-batch
    (12.0, 12.0)
    >>> t.held(1, 3, recompute=True), t.rebuilt(1, 3)                  # stash; rebuilt on top
    (4.0, 8.0)

Layers here save 8 bytes, 4 of them their input and (but the last) 4 their output. Layer 1
saves the input layer 0 also saved as its output, so a stage holding both counts it once
(``act[1] = 8 - 4``). A stage holds, per micro-batch in flight, the union of what its layers
save and the input it was given (the runner keeps it for the input gradient): its first
layer's saved input is that input, counted in the stash and not again (``lead``). The first
stage's input is the step's batch, which the runner holds whole from the step's start to its
end: it counts once per step (``CostModel.step_bytes``), never per micro-batch (``stash[0] =
0``); likewise the last stage holds the step's targets (``CostModel.step_bytes``), and what the
loss saves counts with the last layer's ``act``. So, with ``act`` summed over the stage's
layers [s, e):

- without recompute: ``held = sum(act) + keep[s]``, ``keep[s] = stash[s] - lead[s]``;
- recomputing: ``held = stash[s]`` from F to B, and ``rebuilt = sum(act) - lead[s]`` on top
  while B (or I) rebuilds and consumes the saved tensors.

A split backward (ZB-H1, ZB-V) holds a micro-batch's graph only until its I: from I until W
it holds what the deferred weight gradients keep, each split linear's input and output
gradient, the layers' ``held_for_w_bytes`` (``w``): ``held_for_w = sum(w)``, less on the first
stage the part that is the batch (``w_first``, held all step; on a profile that is not exact,
or a graph's stage, the plain sum, which counts a value two layers' linears read twice).
Without those figures the graph's held (and rebuilt) bytes stay until W instead, as before
they were measured.

Each figure is a difference ``E[end] - S[start]`` of arrays over the layer boundaries
(``forms``): how the chain DP weighs every stage at once.

This is what ``executor.runtime.memory`` measures while a stage runs. It needs each layer's
``saved_input_bytes`` and ``saved_output_bytes`` (``exact``); a profile without them is read as
before they existed (``exact`` False): a layer's saved bytes include its input and share
nothing with its neighbours, a recomputing stage stashes its first layer's ``in_bytes``, the
batch is not counted. That rule is an upper bound wherever layers do share (it double-counts
what two neighbours save), so plans made from older profiles stay safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

__all__ = ["ActivationTerms", "activation_terms"]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class ActivationTerms:
    """Per layer (``act``) and per stage start (``lead``, ``keep``, ``stash``) byte terms of one
    micro-batch size; see the module docstring."""

    act: FloatArray
    lead: FloatArray
    keep: FloatArray
    stash: FloatArray
    exact: bool
    #: per layer, an upper bound of what it adds to any stage holding it without recompute
    #: (its saved bytes, the part of its input it does not save, the loss on the last): the
    #: CP-SAT model's per-layer figure (``solve.ilp_data``); ``act`` where not exact
    bound: FloatArray | None = None
    #: per layer, what a split backward keeps from I to W (``held_for_w_bytes``); None: unknown
    w: FloatArray | None = None
    #: of the first layer's ``w``, the batch's part: the first stage counts it all step
    w_first: float = 0.0
    _forms: dict[bool, tuple[tuple[FloatArray, FloatArray], ...]] = field(
        default_factory=dict, compare=False, repr=False)  # ``forms``, made once per kind

    def held(self, start: int, end: int, recompute: bool) -> float:
        """Bytes one micro-batch holds on stage [start, end) from its F to its B."""
        if recompute:
            return float(self.stash[start])
        return float(self.act[start:end].sum() + self.keep[start])

    def rebuilt(self, start: int, end: int) -> float:
        """Bytes a recomputing stage [start, end) rebuilds for one micro-batch's backward."""
        return float(self.act[start:end].sum() - self.lead[start])

    def held_for_w(self, start: int, end: int, recompute: bool) -> float:
        """Bytes one micro-batch holds on stage [start, end) from its I until its W: what the
        weight gradients keep or, without those figures, what it held (and rebuilt) before."""
        if self.w is None:
            return self.held(start, end, recompute) + (
                self.rebuilt(start, end) if recompute else 0.0)
        return float(self.w[start:end].sum() - (self.w_first if start == 0 else 0.0))

    def forms(self, recompute: bool) -> tuple[tuple[FloatArray, FloatArray], ...]:
        """``(E, S)`` of ``held``, ``held_for_w`` and ``rebuilt`` (zero without recompute): each
        is ``E[end] - S[start]`` for the stage [start, end); E has one entry per layer
        boundary (L + 1), S one per layer (L)."""
        made = self._forms.get(recompute)
        if made is None:
            made = self._forms[recompute] = self._make_forms(recompute)
        return made

    def _make_forms(self, recompute: bool) -> tuple[tuple[FloatArray, FloatArray], ...]:
        n = len(self.act)
        prefix = np.concatenate(([0.0], np.cumsum(self.act)))
        zero_e, zero_s = np.zeros(n + 1), np.zeros(n)
        rebuilt = (prefix, prefix[:-1] + self.lead) if recompute else (zero_e, zero_s)
        held = (zero_e, -self.stash) if recompute else (prefix, prefix[:-1] - self.keep)
        if self.w is None:
            w = (held[0] + rebuilt[0], held[1] + rebuilt[1])
        else:
            w_prefix = np.concatenate(([0.0], np.cumsum(self.w)))
            w_start = w_prefix[:-1].copy()
            w_start[0] += self.w_first
            w = (w_prefix, w_start)
        for arr in (*held, *w, *rebuilt):
            arr.setflags(write=False)  # shared by every caller (the cache)
        return held, w, rebuilt


def activation_terms(saved: FloatArray, saved_in: FloatArray | None,
                     saved_out: FloatArray | None, in_bytes: FloatArray,
                     loss: tuple[float, float] = (0.0, 0.0),
                     held_w: tuple[FloatArray, FloatArray] | None = None) -> ActivationTerms:
    """The terms from per-layer ``saved_bytes``, ``saved_input_bytes``, ``saved_output_bytes``
    and ``in_bytes`` at one micro-batch size (the two parts None: a profile without them);
    ``loss``: what the loss saves, and of that the model's output (``profile_loss``), which
    the last layer's ``act`` takes on (less what that layer saves of its output already);
    ``held_w``: per-layer ``held_for_w_bytes`` and their input parts (the parts read on
    exact profiles only: elsewhere the batch is not apart, and the sum an upper bound)."""
    saved = np.asarray(saved, dtype=np.float64)
    in_bytes = np.asarray(in_bytes, dtype=np.float64)
    loss_saved, loss_in = loss
    if saved_in is None or saved_out is None:
        zero, act = np.zeros_like(saved), saved
        if loss_saved:
            act = saved.copy()
            act[-1] += loss_saved
            act.setflags(write=False)
        w = None if held_w is None else np.asarray(held_w[0], dtype=np.float64).copy()
        if w is not None:
            w.setflags(write=False)
        return ActivationTerms(act, zero, zero, in_bytes, exact=False, bound=act, w=w)
    s_in = np.minimum(np.asarray(saved_in, dtype=np.float64), saved)
    s_out = np.minimum(np.asarray(saved_out, dtype=np.float64), saved)
    shared = np.zeros_like(saved)  # what layer i saves of its input that layer i-1 also saved
    shared[1:] = np.minimum(s_in[1:], s_out[:-1])
    act = saved - shared
    extra = loss_saved - min(loss_in, loss_saved, float(s_out[-1]))
    act[-1] += extra
    bound = saved + np.maximum(in_bytes - s_in, 0.0)
    bound[-1] += extra
    lead = s_in - shared  # a stage's first layer: its saved input is the stash, counted there
    stash = in_bytes.copy()
    stash[:1] = 0.0  # the first stage's input is the batch, held whole for the step
    keep = stash - lead
    w, w_first = None, 0.0
    if held_w is not None:
        w = np.asarray(held_w[0], dtype=np.float64).copy()
        w_first = float(min(held_w[1][0], w[0])) if len(w) else 0.0
    for arr in (act, lead, keep, stash, bound, *([] if w is None else [w])):
        arr.setflags(write=False)
    return ActivationTerms(act, lead, keep, stash, exact=True, bound=bound, w=w,
                           w_first=w_first)
