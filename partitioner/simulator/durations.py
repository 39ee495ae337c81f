"""What each simulated action costs: per-stage durations and memory of a chain or graph partition.

    >>> from partitioner import CostModel, load_profile
    >>> cm = CostModel(load_profile("pipedream/resnet18"), 4, 4, stages=2)
    >>> dur = stage_durations(cm, stage_of_ranges([(0, 35), (35, 70)]), [0, 1])
    >>> [round(f[0], 2) for f in dur.fwd_ms], dur.size_index
    ([78.47, 28.98], [0, 0, 0, 0])

One rule for both shapes: a stage is a set of layers (``stage_of[i]`` = stage of layer i; a
chain's ranges are the special case), and what crosses between stages are the *values* of the
layer graph (``formats.values``: a layer's whole output, or each output it lists, read by the
consumers its edges name; the chain i -> i+1 for a profile without edges).

- F(k,i): the sum of the stage's ``fwd_ms`` at micro-batch i's size; B(k,i): its ``bwd_ms``,
  plus ``fwd_ms`` again when stage k recomputes; a split backward's I(k,i): its
  ``bwd_input_ms`` (plus the recomputed forward: the recomputation happens in I) and W(k,i):
  its ``bwd_weight_ms`` (``CostModel.layer_array``: measured, or the stated rule); each as the
  cost model's ``runtime`` runs it (times ``compute_scale``, plus ``action_ms`` per action).
- SF(k,i) after F: for each value x of a layer of stage k and each *other* stage d that holds
  a consumer of x, one transfer of x's bytes (``link.transfer_ms``); the sender pays them
  all, in one send. SB(k,i) after B (or I): the gradients of the values stage k received
  that have ``grad``, one transfer back per (x, k); W sends nothing. Transfers between stages
  on one device (so also between the stages of one rank) are free.
- The schedule stays the pipeline's: stage k+1's receive waits for stage k's whole send,
  and then the runtime's ``message_ms`` (``Durations.message_ms``; paid transfers only).
  Data that skips stages (u in stage k feeding stage d > k+1) is charged to its sender's
  send, as ``graph.evaluate_assignment`` charges it, and needs no wait of its own: stage d
  receives from d-1 only after d-1 received from d-2 ... after k's send had finished, so it
  has arrived; likewise its gradient is back before stage k's B (k waits for k+1's SB, which
  follows d's). So per micro-batch a stage is occupied exactly the evaluator's stage time.
- Memory held from F to B (to I when split): the stage's ``saved_bytes``; or, when it
  recomputes, its stash: the values it received (once per value) plus the ``in_bytes`` of
  its layers that have no predecessor (the model's inputs), with the saved bytes on top
  while B (or I) rebuilds them; from I to W, what W needs (``w_hold_bytes``: the held and
  rebuilt bytes, or what the layers' ``held_for_w_bytes`` say W keeps; ``cost.holding``
  states the rules).
  What a stage receives weighs the values' bytes on a graph profile (the evaluator's rule)
  and the receiving layer's ``in_bytes`` on a chain profile (``CostModel``'s rule, once per
  sending layer); the two agree wherever ``in_bytes[i]`` is what layer i-1 passes on, as the
  profilers write them. A chain profile that says what its layers share
  (``cost.activations``, exact) takes ``CostModel.activations``' held and rebuilt bytes
  instead, and its first stage holds the batch's inputs, its last the targets, for the whole
  step (``step_bytes``). The
  training state includes the copies of tied parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from partitioner.cost.allreduce import grad_bytes, stage_allreduce_ms
from partitioner.cost.instep import span_ms
from partitioner.cost.model import CostModel, FloatArray, split_microbatches
from partitioner.cost.partition import tied_copies

__all__ = ["Durations", "cross_transfers", "stage_durations", "stage_of_ranges"]

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Durations:
    """Per stage k and distinct micro-batch size s (``[k][s]``): what each action costs."""

    fwd_ms: list[list[float]]
    bwd_ms: list[list[float]]  # includes the recomputed forward
    input_ms: list[list[float]]  # I: includes the recomputed forward
    weight_ms: list[list[float]]  # W
    send_f_ms: list[list[float]]  # every forward transfer of stage k's outputs
    send_b_ms: list[list[float]]  # the gradient of everything stage k received
    hold_bytes: list[list[float]]  # held from F to B (or I): saved activations, or the stash
    rebuild_bytes: list[list[float]]  # extra during B (or I): saved, when recomputing
    w_hold_bytes: list[list[float]]  # from I to W: what W needs (or hold + rebuild)
    state_bytes: list[float]  # weights + gradients + optimizer state
    size_index: list[int]  # micro-batch i -> s
    message_ms: float = 0.0  # a paid transfer reaches its receiver this long after its send
    allreduce_ms: tuple[float, ...] = ()  # per stage, its gradients' all-reduce (D > 1)
    step_bytes: tuple[float, float] = (0.0, 0.0)  # held all step: inputs (first), targets (last)
    #: with a device model, (F, B, I, W) tables of the host's time to issue each action and the
    #: device's to run it (the tables above are then their spans: ``cost.instep.span_ms``);
    #: empty without one (no host time; the device's time is the action's)
    host_ms: tuple[list[list[float]], ...] = ()
    device_ms: tuple[list[list[float]], ...] = ()


def stage_of_ranges(ranges: Sequence[tuple[int, int]]) -> IntArray:
    """The stage of every layer of contiguous ranges ``[(0, e0), (e0, e1), ...]``.

        >>> stage_of_ranges([(0, 2), (2, 5)]).tolist()
        [0, 0, 1, 1, 1]
    """
    lengths = [end - start for start, end in ranges]
    return np.repeat(np.arange(len(ranges), dtype=np.int64), lengths)


def _edge_arrays(cm: CostModel) -> tuple[IntArray, IntArray]:
    """Sources and destinations of the layer graph's edges (the chain when it has none)."""
    n, edges = cm.profile.num_layers, cm.profile.edges
    if edges is None:
        src = np.arange(n - 1, dtype=np.int64)
        return src, src + 1
    pairs = np.array(edges, dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def cross_transfers(cm: CostModel,
                    stage_of: IntArray) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """Every transfer between stages as arrays (x, its stage, d, v): value x
    (``cm.values``; on a profile without ``outputs``, x is its layer) goes from its producer's
    stage to stage d != that one, once per (x, d) however many of x's consumers d holds; v is
    the first of them (lowest index) in d.

        >>> from partitioner import CostModel, load_profile
        >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=2)
        >>> [a.tolist() for a in cross_transfers(cm, stage_of_ranges([(0, 13), (13, 26)]))]
        [[12], [0], [1], [13]]
    """
    vals = cm.values
    x, dst = vals.pair_value, vals.pair_layer
    src_stage, dst_stage = stage_of[vals.producer[x]], stage_of[dst]
    cut = src_stage != dst_stage
    x, dst, dst_stage = x[cut], dst[cut], dst_stage[cut]
    big_k = int(stage_of.max()) + 1 if len(stage_of) else 1
    # one transfer per (x, d): keep the first pair of each after sorting by (x, d, v)
    order = np.lexsort((dst, dst_stage, x))
    x, dst, dst_stage = x[order], dst[order], dst_stage[order]
    key = x * big_k + dst_stage
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    xs = x[first]
    return xs, stage_of[vals.producer[xs]], dst_stage[first], dst[first]


def _stage_sums(values: FloatArray, order: IntArray, bounds: IntArray) -> FloatArray:
    """Per stage, the sum of ``values`` over its layers: prefix sums over the layers sorted
    by stage (for ranges the layer order itself, exactly the chain cost model's sums)."""
    prefix = np.concatenate(([0.0], np.cumsum(values[order])))
    out: FloatArray = prefix[bounds[1:]] - prefix[bounds[:-1]]
    return out


def _per_stage(stage: IntArray, values: FloatArray, big_k: int) -> FloatArray:
    """Sums of ``values`` by stage (as floats also when there are none)."""
    out: FloatArray = np.bincount(stage, values, minlength=big_k).astype(np.float64)
    return out


def stage_durations(cm: CostModel, stage_of: IntArray, devices: Sequence[int]) -> Durations:
    """The durations and memory of every stage of the partition ``stage_of`` (K =
    ``len(devices)``; stages that share a device index exchange data for free)."""
    sizes = split_microbatches(cm.replica_batch, cm.microbatches)
    distinct = sorted(set(sizes), reverse=True)
    big_k, n_sizes = len(devices), len(distinct)
    order = np.argsort(stage_of, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(stage_of, minlength=big_k))))
    x, src, dst, v = cross_transfers(cm, stage_of)
    grad = cm.values.grad[x]
    devs = np.asarray(devices)
    paid = devs[src] != devs[dst]  # transfers between devices take time
    roots = np.ones(cm.profile.num_layers, dtype=bool)  # layers without a predecessor
    roots[_edge_arrays(cm)[1]] = False
    root_stage = stage_of[roots]
    chain = cm.profile.edges is None
    if chain:  # CostModel's rule: the receiving layer's in_bytes, once per sending layer
        u = cm.values.producer[x]
        _, once = np.unique(u * big_k + dst, return_index=True)
        recv_stage, recv_layer = dst[once], v[once]
    rc = np.array([cm.recomputes(k) for k in range(big_k)])
    table = {key: np.zeros((big_k, n_sizes))
             for key in ("f", "b", "i", "w", "sf", "sb", "hold", "rebuild", "w_hold")}
    two_clocks = cm.runtime.device is not None
    host = {key: np.zeros((big_k, n_sizes)) for key in "fbiw"} if two_clocks else {}
    device = {key: np.zeros((big_k, n_sizes)) for key in "fbiw"} if two_clocks else {}
    for s, b in enumerate(distinct):
        if two_clocks:  # spans of the host and device clocks instead of sums
            spans = _two_clocks(cm, b, stage_of, order, bounds, rc, host, device, s)
        else:
            again = np.where(rc, _stage_sums(cm.layer_array("recompute_ms", b), order, bounds),
                             0.0)
            spans = [_stage_sums(cm.layer_array(key, b), order, bounds) + extra for key, extra in
                     (("fwd_ms", 0.0), ("bwd_ms", again), ("bwd_input_ms", again),
                      ("bwd_weight_ms", 0.0))]
        ms = np.where(paid, cm.value_transfer_ms(b)[x], 0.0)
        received = (_per_stage(recv_stage, cm.layer_array("in_bytes", b)[recv_layer], big_k)
                    if chain else _per_stage(dst, cm.value_bytes(b)[x], big_k))
        stash = received + _per_stage(root_stage, cm.layer_array("in_bytes", b)[roots], big_k)
        for key, span in zip("fbiw", spans, strict=True):  # + the runner's cost per action
            table[key][:, s] = span + cm.runtime.action_ms
        table["sf"][:, s] = _per_stage(src, ms, big_k)
        table["sb"][:, s] = _per_stage(dst, np.where(grad, ms, 0.0), big_k)
        terms = cm.activations(b)  # not exact: act is the saved bytes (and the loss's)
        act = saved = _stage_sums(terms.act, order, bounds)
        if terms.exact:  # a chain's stages are ranges: start = each stage's first layer
            start = order[bounds[:-1]]
            stash, saved = terms.stash[start], act - terms.lead[start]
            act = act + terms.keep[start]
        table["hold"][:, s] = np.where(rc, stash, act)
        table["rebuild"][:, s] = np.where(rc, saved, 0.0)
        table["w_hold"][:, s] = table["hold"][:, s] + table["rebuild"][:, s]
        if terms.w is not None:  # what W keeps, measured (the batch's part apart if exact)
            table["w_hold"][:, s] = _stage_sums(terms.w, order, bounds) - (np.where(
                order[bounds[:-1]] == 0, terms.w_first, 0.0) if terms.exact else 0.0)
    state = _stage_sums(cm.param_state_bytes(), order, bounds)
    if cm.profile.tied:
        state = state + tied_copies(cm, stage_of.tolist(), big_k)
    lists = {key: arr.tolist() for key, arr in table.items()}
    allreduce = (tuple(stage_allreduce_ms(cm, _stage_sums(grad_bytes(cm), order, bounds)
                                          .tolist())) if cm.replicas > 1 else ())
    action = cm.runtime.action_ms  # the runner's own cost per action: its host's
    return Durations(lists["f"], lists["b"], lists["i"], lists["w"], lists["sf"], lists["sb"],
                     lists["hold"], lists["rebuild"], lists["w_hold"], state.tolist(),
                     [distinct.index(b) for b in sizes], cm.runtime.message_ms, allreduce,
                     cm.step_bytes(),
                     tuple((host[key] + action).tolist() for key in host),
                     tuple((device[key] + action).tolist() for key in device))


def _two_clocks(cm: CostModel, b: float, stage_of: IntArray, order: IntArray, bounds: IntArray,
                rc: npt.NDArray[np.bool_], host: dict[str, FloatArray],
                device: dict[str, FloatArray], s: int) -> list[FloatArray]:
    """With a device model, at size b: each stage's F, B, I and W as spans (``span_ms``; B
    and I with the recomputed forward in front), and their host and device times into column
    s of ``host`` and ``device``. A forward issues its layers in order, a backward in reverse."""
    backwards = np.lexsort((-np.arange(len(stage_of)), stage_of))  # each stage's, reversed

    def clocks(key: str, seq: IntArray) -> tuple[FloatArray, FloatArray, FloatArray]:
        h, d = cm.layer_array(f"host:{key}", b), cm.layer_array(f"device:{key}", b)
        return (_stage_sums(h, seq, bounds), _stage_sums(d, seq, bounds),
                span_ms(h[seq], d[seq], bounds))

    fh, fd, fwd = clocks("fwd_ms", order)
    host["f"][:, s], device["f"][:, s] = fh, fd
    rh, rd, again = clocks("recompute_ms", order)
    spans = [fwd]
    for key, kind in (("bwd_ms", "b"), ("bwd_input_ms", "i"), ("bwd_weight_ms", "w")):
        bh, bd, span = clocks(key, backwards)
        if kind != "w":  # the recomputation first: its span then B's, or B's after its issue
            span = np.where(rc, np.maximum(again + bd, rh + span), span)
            bh, bd = bh + np.where(rc, rh, 0.0), bd + np.where(rc, rd, 0.0)
        host[kind][:, s], device[kind][:, s] = bh, bd
        spans.append(span)
    return spans
