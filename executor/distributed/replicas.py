"""Data-parallel replicas of a pipeline: each rank's place, its groups, the gradients' all-reduce.

    groups = replica_groups(plan.rank_layout, timeout_s=60, backend="gloo")  # on every rank
    reducer = GradReducer(runner.parameters(), groups.replica)
    reducer.start(); ...; reducer.finish()   # each gradient summed over the stage's D copies

A plan with D replicas runs on R x D ranks: ``layout[d][r]`` is the global rank of replica d's
pipeline rank r. Each replica runs the whole pipeline on its share of the global batch (replica
d: samples [d B/D, (d+1) B/D)), its micro-batch losses weighted by their size over B, the
global batch, so that summing a stage's gradients over its D copies gives the gradient of the
whole batch. Two kinds of group carry that, made by every rank in the same order (as
torch.distributed requires of ``new_group``): one per replica (its pipeline, for the messages
between its stages) and one per pipeline rank r (the D copies of r's stages, for the gradients'
all-reduce and a sharded optimizer's state). ``GradReducer`` keeps the gradients in buckets of
about ``BUCKET_BYTES`` and all-reduces each (SUM, asynchronously, so that a rank's reduction
runs while its last messages go out). At a step's start (``attach``) every gradient of a bucket
of several becomes a view into the bucket's one buffer (zeroed where the optimizer cleared it),
so backward accumulates into the buffer and the sum needs no packing and no copies back: a
model of many small tensors (a ResNet's BatchNorms) paid one of each per tensor, time the
ring model of bytes alone did not see. A gradient put in place of a view between
``attach`` and the sum (by the user) is packed and copied back as before.

``sharded`` turns an optimizer into a ZeRO-1 one over the replica group: each copy keeps the
state of about 1/D of the stage's parameters, steps those, and broadcasts them to the others.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from executor.distributed.transport import PeerError
from executor.graphs.batches import batch_size_of, split_tree
from partitioner.formats.plan import Plan
from partitioner.formats.plan_replicas import default_layout

__all__ = ["BUCKET_BYTES", "GradReducer", "ReplicaGroups", "for_plan", "replica_groups", "sharded",
           "share_of", "sum_loss"]

#: The target size of one bucket of the gradients' all-reduce (a larger gradient goes alone).
BUCKET_BYTES = 4 << 20

Layout = Sequence[Sequence[int]]

_CACHE: dict[tuple[Any, ...], tuple[Any, list[Any], list[Any]]] = {}


@dataclass(frozen=True)
class ReplicaGroups:
    """This rank's place in ``layout`` (replica ``d``, pipeline rank ``r``), the group of its
    replica's pipeline and the group of the D copies of its pipeline rank (``replica``);
    ``replicas[r]``: the copies' group of every pipeline rank r."""

    layout: tuple[tuple[int, ...], ...]
    d: int
    r: int
    pipeline: Any
    replica: Any
    replicas: tuple[Any, ...]

    @property
    def count(self) -> int:
        """D: the copies of the pipeline."""
        return len(self.layout)

    def copies(self, r: int) -> list[int]:
        """The global ranks of the D copies of pipeline rank ``r``, by replica."""
        return [ranks[r] for ranks in self.layout]


def replica_groups(layout: Layout, *, timeout_s: float, backend: str) -> ReplicaGroups:
    """The groups of ``layout`` for this rank (made once per world: every rank makes all D
    pipeline groups, then all R replica groups, in that order; later calls reuse them)."""
    rows = tuple(tuple(int(g) for g in ranks) for ranks in layout)
    world, me = dist.get_world_size(), dist.get_rank()
    flat = sorted(g for ranks in rows for g in ranks)
    if flat != list(range(world)):
        raise ValueError(f"the plan's layout {[list(r) for r in rows]} does not name each of "
                         f"the world's {world} ranks 0..{world - 1} once; launch as many ranks "
                         f"as the plan's R x D = {len(flat)}")
    key = (rows, backend)
    cached = _CACHE.get(key)
    if cached is None or cached[0] is not dist.group.WORLD:
        timeout = timedelta(seconds=timeout_s)
        pipes = [dist.new_group(list(ranks), timeout=timeout, backend=backend) for ranks in rows]
        copies = [dist.new_group([ranks[r] for ranks in rows], timeout=timeout, backend=backend)
                  for r in range(len(rows[0]))]
        cached = (dist.group.WORLD, pipes, copies)
        _CACHE[key] = cached
    _, pipes, copies = cached
    d = next(d for d, ranks in enumerate(rows) if me in ranks)
    r = rows[d].index(me)
    return ReplicaGroups(rows, d, r, pipes[d], copies[r], tuple(copies))


def for_plan(plan: Plan, pipeline_ranks: int, group: Any,
             timeout_s: float) -> ReplicaGroups | None:
    """The replica groups of ``plan`` for this rank (None for a plan of one replica), after
    checking that the world is the plan's R x D ranks."""
    big_d = plan.replicas
    if big_d == 1:
        return None
    if group is not None:
        raise ValueError(f"a plan with D={big_d} replicas runs on the whole world, not on "
                         f"group {dist.get_process_group_ranks(group)}: leave group=None")
    world = dist.get_world_size()
    if world != pipeline_ranks * big_d:
        raise ValueError(f"the world has {world} ranks but the plan runs R={pipeline_ranks} "
                         f"pipeline ranks x D={big_d} replicas = {pipeline_ranks * big_d}; "
                         f"start that many (torchrun --nproc-per-node "
                         f"{pipeline_ranks * big_d}, or over nodes)")
    layout = plan.layout or default_layout(pipeline_ranks, big_d)
    if any(len(ranks) != pipeline_ranks for ranks in layout):
        raise ValueError(f"the plan's layout {[list(r) for r in layout]} gives each replica "
                         f"{len(layout[0])} ranks but its schedule has {pipeline_ranks} rows; "
                         f"give one global rank per row")
    return replica_groups(layout, timeout_s=timeout_s, backend=str(dist.get_backend()))


def share_of(batch: Any, what: str, groups: ReplicaGroups | None, plan: Plan) -> Any:
    """Replica d's share of ``batch``: samples [d B/D, (d+1) B/D) of the global batch, or the
    batch itself when it is already a share of B/D samples (or there is one replica)."""
    if groups is None or batch is None:
        return batch
    d, big_d, n = groups.d, groups.count, batch_size_of(batch, what)
    big_b, share = plan.global_batch, plan.replica_batch
    if n == big_b:
        return split_tree(batch, [share] * big_d)[d]
    if n == share:
        return batch
    raise ValueError(f"the {what} hold {n} samples; with D={big_d} replicas give the global "
                     f"batch (B={big_b}: each replica takes its share of {share}) or this "
                     f"replica's share ({share} samples)")


def sum_loss(loss: torch.Tensor, groups: ReplicaGroups) -> torch.Tensor:
    """The global batch's loss on the ranks of the last stage: the sum of the replicas'
    (each already weighted by its share of B)."""
    total = loss.detach().clone()
    try:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=groups.replica)
    except (RuntimeError, OSError) as exc:
        raise PeerError(f"the sum of the loss over the replicas' last stages on ranks "
                        f"{groups.copies(groups.r)} failed: a copy failed, was killed or hangs "
                        f"({type(exc).__name__})") from exc
    return total


class GradReducer:
    """The gradients of ``params`` summed over ``group`` (the D copies of a pipeline rank), in
    buckets of about ``bucket_bytes`` of one dtype and device each, in the parameters' order
    (the same on every copy). A parameter without a gradient counts as zeros."""

    def __init__(self, params: Sequence[torch.nn.Parameter], group: Any, ranks: Sequence[int],
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={bucket_bytes}: a bucket holds at least one byte")
        self.group, self.ranks = group, list(ranks)
        self.buckets: list[list[torch.nn.Parameter]] = []
        open_: dict[tuple[torch.dtype, torch.device], tuple[list[torch.nn.Parameter], int]] = {}
        for p in params:
            if not p.requires_grad:
                continue
            key, size = (p.dtype, p.device), p.numel() * p.element_size()
            bucket, used = open_.get(key, ([], 0))
            if bucket and used + size > bucket_bytes:
                self.buckets.append(bucket)
                bucket, used = [], 0
            bucket.append(p)
            open_[key] = (bucket, used + size)
        self.buckets += [bucket for bucket, _ in open_.values() if bucket]
        self._flats: dict[int, torch.Tensor] = {}  # bucket -> its buffer (buckets of several)
        self._cut: dict[int, list[torch.Tensor]] = {}  # bucket -> the buffer's views
        self._pending: list[tuple[Any, torch.Tensor, list[torch.nn.Parameter], bool]] = []
        self._started = 0.0
        self.last_ms: float | None = None  # the last step's, from start() to finish()'s end

    def _views(self, b: int) -> list[torch.Tensor]:
        """Bucket b's buffer (made once) cut into one view per parameter, in its order."""
        views = self._cut.get(b)
        if views is None:
            bucket = self.buckets[b]
            flat = self._flats[b] = torch.empty(sum(p.numel() for p in bucket),
                                                dtype=bucket[0].dtype, device=bucket[0].device)
            views, offset = [], 0
            for p in bucket:
                views.append(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            self._cut[b] = views
        return views

    def attach(self) -> None:
        """Make every gradient of a bucket of several a view into the bucket's buffer (a step's
        start, before any backward): zeros where it is None, its values where it is a tensor
        of its own (of the parameter's dtype and device; others stay as they are)."""
        for b, bucket in enumerate(self.buckets):
            if len(bucket) < 2:
                continue
            for p, view in zip(bucket, self._views(b), strict=True):
                g = p.grad
                if g is None:
                    p.grad = view.zero_()
                elif not _same(g, view) and g.dtype == p.dtype and g.device == p.device \
                        and g.layout == torch.strided:
                    p.grad = view.copy_(g)

    def start(self) -> None:
        """Start the all-reduce of every bucket (after the step's last backward here)."""
        self._started = time.perf_counter()
        for b, bucket in enumerate(self.buckets):
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in bucket if p.grad is not None]
            flat, packed = grads[0], False
            if len(grads) == 1 and grads[0].is_contiguous():
                pass  # summed in place
            elif b in self._flats and all(_same(g, v) for g, v in zip(grads, self._views(b),
                                                                       strict=True)):
                flat = self._flats[b]  # the gradients are views into it: summed in place
            else:
                flat, packed = torch.cat([g.reshape(-1) for g in grads]), True
            work = self._guard(lambda f=flat: dist.all_reduce(
                f, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
            self._pending.append((work, flat, bucket, packed))

    def finish(self) -> None:
        """Wait for the all-reduces and put the sums back into the gradients that were packed."""
        pending, self._pending = self._pending, []
        for work, flat, bucket, packed in pending:
            self._guard(work.wait)
            if not packed:
                continue  # summed in place
            offset = 0
            for p in bucket:
                assert p.grad is not None
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        self.last_ms = (time.perf_counter() - self._started) * 1e3

    def _guard(self, call: Any) -> Any:
        try:
            return call()
        except (RuntimeError, OSError) as exc:
            self._pending = []
            raise PeerError(f"the all-reduce of the stage's gradients over its copies on ranks "
                            f"{self.ranks} failed: a copy failed, was killed or hangs "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                            ) from exc


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is the very view ``b`` (same memory, shape and strides)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def sharded(optimizer: torch.optim.Optimizer, group: Any) -> ZeroRedundancyOptimizer:
    """``optimizer`` (its class, parameter groups and settings) as a ZeRO-1 optimizer over
    ``group``: each copy of the stage keeps the state of its share of the parameters only."""
    groups = [dict(g) for g in optimizer.param_groups]
    return ZeroRedundancyOptimizer(groups, type(optimizer), process_group=group,
                                   **optimizer.defaults)
