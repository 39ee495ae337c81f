"""What-if simulator: replays a Schedule with cost-model durations into a predicted Timeline.

    >>> from partitioner import CostModel, load_profile
    >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=2)
    >>> res = simulate(cm, [(0, 13), (13, 26)])
    >>> round(res.step_ms, 1), round(res.bubble_fraction, 3), len(res.timeline.events)
    (115.6, 0.233, 16)

The model (the choices a reader needs to trust the numbers):

- Stages are layer ranges or, for a layer graph, any convex sets of layers (``nodes=``); a
  chain's ranges are the special case of one rule (``durations.py`` says what each action
  costs, edge by edge, exactly as ``graph.evaluate_assignment`` charges it).
- Each rank runs its own action list in order (the Schedule is never re-derived; a rank runs
  one stage, or V of them under an interleaved or V-shaped placement, ``schedule.rank_of``).
  F(k,i) takes stage k's forward at micro-batch i's actual size (``split_microbatches``:
  uneven sizes, larger first); B(k,i) takes its backward, plus the forward again when k
  recomputes; a split backward's I(k,i) its input gradient (the recomputation, if any,
  happens in I) and W(k,i) its weight gradient.
- Communication. After F(k,i) the stage sends its values on (SF: to k+1, and on a graph
  also what skips ahead to later stages; each value once per stage that reads it), after
  B(k,i) or I(k,i) the gradients of the values it received back (SB; values without
  gradient send none; W sends nothing); a send *occupies the sender* for ``latency + bytes /
  bandwidth`` per transfer and a receive takes no time but waits until the previous stage's
  send has finished. So a stage is occupied compute + comm_in + comm_out per micro-batch,
  exactly the partitioners' stage time (their bottleneck is the simulated throughput limit),
  and free communication gives the paper's closed forms. Stages on the same device, and so
  the stages of one rank, exchange tensors for free.
- Devices. ``devices[k]`` is stage k's device (default: its rank's); a rank is one device,
  so its stages must share one. Ranks that share a device run one action at a time; when the
  device frees, the action that has been ready longest runs (ties: the lower rank). An
  optional optimizer step (``optimizer_ms`` for the whole model, split by parameter bytes)
  ends each stage once its device has finished all its compute (the flush at the end of a
  GPipe step).
- Memory, replayed per stage: weights + gradients + optimizer state (with the copies of tied
  parameters whose owner is in another stage), plus per micro-batch in flight (F to B, or to
  I when split) its saved activations, or, when the stage recomputes, its stashed inputs,
  with its saved activations on top while B (or I) rebuilds and consumes them, from I to W
  what W needs (``Durations.w_hold_bytes``), and on the first stage the batch's inputs and on
  the last its targets from the step's start, where the profile has them
  (``cost.activations``). This is ``CostModel.stage_memory_bytes``'s (and the graph
  evaluator's) closed form wherever both describe the same step (``cost.holding`` states the
  rules). A rank's memory
  is its stages' together, replayed as they run (``rank_peak_bytes``).
- Replicas (D > 1). Each of D copies of the pipeline runs the same schedule on its share of
  the batch (the cost model's micro-batches of B/(D M)), in lockstep, so one replays them
  all. Each stage then all-reduces its gradients over its D copies (``cost.allreduce``: a
  ring over the slowest link the group crosses), on its rank's network, independently of
  compute: ``overlapped`` (the cost model's ``allreduce``), a stage's all-reduce starts once
  its last backward (B or W) of the step is done, a rank's stages one after another in the
  order they finish, so the step ends at max over stages of (last backward end + its
  all-reduce), or the rank's compute end if later; ``after``, every all-reduce starts once
  the whole pipeline's compute is done. The optimizer step of a stage follows its
  all-reduce. ``SimResult.allreduce`` says which was assumed.
- The predicted Timeline holds the compute actions and the sends that take time (receives
  are instants: their waiting shows as the gap before the action that needed them), one row
  per stage with the rank of each (its trace and chart draw one row per rank).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from partitioner.cost.model import CostModel
from partitioner.formats.timeline import Event, Timeline
from partitioner.schedule.generators import make_schedule
from partitioner.schedule.ir import Action, Schedule, ScheduleError, validate
from partitioner.simulator.durations import Durations, stage_durations
from partitioner.simulator.inputs import check_rank_devices, check_stages
from partitioner.simulator.program import (
    BWD,
    FWD,
    INPUT,
    KINDS,
    RF,
    SB,
    SF,
    WEIGHT,
    Op,
    rank_programs,
)

__all__ = ["SimResult", "device_indices", "ranges_from_boundaries", "simulate"]

SLOT = [0] * (max(FWD, BWD, INPUT, WEIGHT) + 1)  # a compute kind -> F, B, I, W (0-3)
SLOT[FWD], SLOT[BWD], SLOT[INPUT], SLOT[WEIGHT] = 0, 1, 2, 3

@dataclass(frozen=True)
class SimResult:
    """Figures of one simulated training step (times in ms from the step's start)."""

    step_ms: float  # first action's start to the last stage's end (optimizer step included)
    bubble_fraction: float  # 1 - (compute + optimizer) / (devices x step): idle or sending
    stage_busy_ms: tuple[float, ...]  # per stage, F + B or F + I + W (+ recompute)
    stage_comm_ms: tuple[float, ...]  # per stage, time spent sending
    stage_peak_bytes: tuple[float, ...]  # per stage, replayed peak memory
    timeline: Timeline | None  # None when simulate(..., record=False)
    rank_of: tuple[int, ...] = ()  # the rank of each stage (empty: stage k on rank k)
    rank_peak_bytes: tuple[float, ...] = ()  # per rank, its stages' memory together, replayed
    allreduce_ms: tuple[float, ...] = ()  # per stage, its gradients' all-reduce (D > 1)
    allreduce: str = ""  # how it was placed: overlapped, after, or "" (one replica)
    stage_activation_peak_bytes: tuple[float, ...] = ()  # per stage, the peak less the state

    @property
    def rank_busy_ms(self) -> tuple[float, ...]:
        """Per rank, the compute time of its stages."""
        rank_of = self.rank_of or tuple(range(len(self.stage_busy_ms)))
        out = [0.0] * (max(rank_of) + 1 if rank_of else 0)
        for k, busy in enumerate(self.stage_busy_ms):
            out[rank_of[k]] += busy
        return tuple(out)


def ranges_from_boundaries(boundaries: Sequence[int]) -> list[tuple[int, int]]:
    """``[(0, 7), (7, 26)]`` from cut points ``(0, 7, 26)``."""
    return [(boundaries[k], boundaries[k + 1]) for k in range(len(boundaries) - 1)]


def device_indices(devices: Sequence[str], rank_of: Sequence[int] | None = None) -> list[int]:
    """Which stages share a device, from a plan's device names: equal names with an index
    (``cuda:0``) are one device; a name without one (``cpu``) is a device of the stage's rank
    (``rank_of[k]``; default: each stage its own rank, as the distributed runner places them).

        >>> device_indices(["cuda:0", "cuda:0", "cuda:1"]), device_indices(["cpu", "cpu"])
        ([0, 0, 1], [0, 1])
        >>> device_indices(["cpu"] * 4, rank_of=[0, 1, 1, 0])   # V shape: a rank, a device
        [0, 1, 1, 0]
    """
    index: dict[str, int] = {}
    out = []
    for k, name in enumerate(devices):
        key = name if ":" in name else f"{name}#{rank_of[k] if rank_of is not None else k}"
        out.append(index.setdefault(key, len(index)))
    return out


def simulate(
    cm: CostModel,
    ranges: Sequence[tuple[int, int]] | None = None,
    schedule: Schedule | None = None,
    devices: Sequence[int] | None = None,
    optimizer_ms: float = 0.0,
    record: bool = True,
    *,
    nodes: Sequence[Sequence[int]] | None = None,
    durations: Durations | None = None,
) -> SimResult:
    """Replay ``schedule`` (default: ``cm.schedule`` for K stages, M, V stages per rank) on
    stages holding layers ``ranges[k] = (start, end)``, or the layer-graph nodes ``nodes[k]``
    (convex sets; give one of the two); ``devices[k]``: stage k's device (default: its rank's);
    ``durations``: ``stage_durations`` of these stages on these devices, made once by a
    caller that simulates many schedules of one partition.

        >>> from partitioner import CostModel, load_profile
        >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=2)
        >>> simulate(cm, [(0, 13), (13, 26)], devices=[0, 0]).bubble_fraction  # one device
        0.0
        >>> cm = CostModel(load_profile("pipedream/resnet18"), 4, 4, stages=2)
        >>> round(simulate(cm, nodes=[range(35), range(35, 70)]).step_ms, 1)
        828.0
    """
    m = cm.microbatches
    stage_of = check_stages(cm, ranges, nodes, devices, optimizer_ms)
    big_k = cm.stages
    if schedule is None:
        schedule = make_schedule(cm.schedule, big_k, m, cm.stages_per_rank)
    elif (schedule.stages, schedule.microbatches) != (big_k, m):
        raise ValueError(f"schedule {schedule.name!r} is for K={schedule.stages}, "
                         f"M={schedule.microbatches} but the plan has K={big_k}, M={m}; "
                         f"make the schedule with make_schedule(name, {big_k}, {m})")
    programs = rank_programs(schedule)
    devs = list(schedule.rank_of) if devices is None else list(devices)
    check_rank_devices(schedule, devs)
    dur = stage_durations(cm, stage_of, devs) if durations is None else durations
    sim = _Replay(schedule, devs, dur, record)
    sim.run(programs)
    if any(sim.pos[r] < len(programs[r]) for r in range(schedule.ranks)):
        validate(schedule)  # names the deadlock with the grid
        raise ScheduleError(f"schedule {schedule.name!r} did not finish in the simulation")
    return _result(cm, schedule, dur, sim, optimizer_ms, record)


class _Replay:
    """The event loop's state. A heap holds (time a rank can go on, rank); a rank runs its
    steps until a receive finds no matching send yet (the sender pushes it back when it
    sends) or, on a shared device, after each step (so the device serves ranks in order of
    readiness). Popped times never decrease, which is what makes both rules exact. A stage's
    memory is kept in locals while its rank runs it, and stored when the rank turns to another
    of its stages or stops."""

    def __init__(self, sched: Schedule, devs: list[int], dur: Durations, record: bool) -> None:
        big_k, m, ranks = sched.stages, sched.microbatches, sched.ranks
        self.m, self.devs, self.dur, self.record = m, devs, dur, record
        self.rank_of = sched.rank_of
        self.stages_of = [[k for k in range(big_k) if self.rank_of[k] == r] for r in range(ranks)]
        self.arrived = {SF: [[-1.0] * m for _ in range(big_k)],  # [k][i]: k's output of i
                        SB: [[-1.0] * m for _ in range(big_k)]}  # reached k+1 / k-1
        self.pos, self.ready = [0] * ranks, [0.0] * ranks
        self.busy, self.comm = [0.0] * big_k, [0.0] * big_k
        self.held, self.peak = [0.0] * big_k, [0.0] * big_k
        self.held[0] = self.peak[0] = dur.step_bytes[0]  # the batch's inputs, all step
        self.held[-1] = self.peak[-1] = self.held[-1] + dur.step_bytes[1]  # and its targets
        self.backward_end = [0.0] * big_k  # when each stage's last B or W ended
        # activations of the rank's stages together
        self.rank_peak = [sum(self.held[k] for k in stages) for stages in self.stages_of]
        self.events: list[Event] = []

    def run(self, programs: list[list[Op]]) -> None:
        dur, size, m, record = self.dur, self.dur.size_index, self.m, self.record
        arrived_f, arrived_b = self.arrived[SF], self.arrived[SB]
        pos, ready, busy_ms, comm_ms = self.pos, self.ready, self.busy, self.comm
        held_bytes, peak_bytes, rank_peak, events = self.held, self.peak, self.rank_peak, \
            self.events
        rank_of, stages_of = self.rank_of, self.stages_of
        backward_end = self.backward_end
        last = len(rank_of) - 1
        rank_dev = [self.devs[stages[0]] for stages in stages_of]
        dev_free = dict.fromkeys(rank_dev, 0.0)
        shared = [rank_dev.count(d) > 1 for d in rank_dev]
        multi = any(len(stages) > 1 for stages in stages_of)
        delay = dur.message_ms
        # the receive a rank waits for: k * m + i for RF(k, i), -(k * m + i) - 1 for RB(k, i)
        blocked: list[int | None] = [None] * len(stages_of)
        # per stage k, what its actions read: durations, memory, where its messages go
        # with a device model each action has a host time and a device time besides its span
        clocks = bool(dur.host_ms)
        issue = [[h[k] for h in dur.host_ms] if clocks else [] for k in range(last + 1)]
        run_ms = [[d[k] for d in dur.device_ms] if clocks else [] for k in range(last + 1)]
        host_at = dict.fromkeys(rank_dev, 0.0)  # when each device's host has issued all so far
        # whether stage k's host waits for what it receives from k-1 and from k+1: from another
        # device, yes (the runner reads a header); on its own device the stream orders it
        waits = [(self.devs[k - 1] != self.devs[k], self.devs[min(k + 1, last)] != self.devs[k])
                 for k in range(last + 1)]
        fixed = [(dur.fwd_ms[k], dur.bwd_ms[k], dur.input_ms[k], dur.weight_ms[k],
                  dur.hold_bytes[k], dur.rebuild_bytes[k], dur.w_hold_bytes[k], dur.state_bytes[k],
                  dur.send_f_ms[k], dur.send_b_ms[k], arrived_f[k], arrived_b[k],
                  arrived_f[k - 1], arrived_b[min(k + 1, last)],
                  rank_of[min(k + 1, last)], (k + 1) * m, rank_of[k - 1], -(k - 1) * m - 1,
                  [j for j in stages_of[rank_of[k]] if j != k])  # the stages k shares its rank with
                 for k in range(last + 1)]
        heap = [(0.0, r) for r in range(len(programs))]
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            t, r = pop(heap)
            ops, p, n, first, cur = programs[r], pos[r], len(programs[r]), True, -1
            rpeak, other = rank_peak[r], 0.0
            held = peak = 0.0  # stage cur's, loaded when the rank turns to it
            h = host_at[rank_dev[r]]
            while p < n:
                recv, work, send, k, i, act = ops[p]
                if k != cur:  # the rank turns to stage k: store the last one's, load k's
                    if cur >= 0:
                        held_bytes[cur], peak_bytes[cur] = held, peak
                    cur = k
                    (f_ms, b_ms, i_ms, w_ms, hold, rebuild, w_hold, state, sf_ms, sb_ms, out_f,
                     out_b,
                     in_f, in_b, dst_f, wake_f, dst_b, wake_b, mates) = fixed[k]
                    held, peak = held_bytes[k], peak_bytes[k]
                    if multi:  # what the rank's other stages hold meanwhile
                        other = held_bytes[mates[0]] if len(mates) == 1 else sum(
                            [held_bytes[j] for j in mates])
                if recv:
                    arrival = in_f[i] if recv == RF else in_b[i]
                    if arrival < 0:  # no matching send yet: its sender will push r back
                        blocked[r] = k * m + i if recv == RF else -(k * m + i) - 1
                        break
                    if arrival > t:
                        t = arrival
                    if arrival > h and waits[k][recv != RF]:  # a receive from afar
                        h = arrival
                    if not (work or send):
                        p += 1
                        continue
                if shared[r]:
                    if not first:  # queue for the device in order of readiness
                        push(heap, (t, r))
                        break
                    t = max(t, dev_free[rank_dev[r]])
                first = False
                s = size[i]
                if work:
                    start, kind = t, SLOT[work]
                    span = (f_ms, b_ms, i_ms, w_ms)[kind][s]
                    if clocks:  # the device runs it from t, the host issues it from h
                        end = max(t + run_ms[k][kind][s], h + span)
                        if h > t:
                            start = h
                        h += issue[k][kind][s]
                    else:
                        end = t + span
                if work == FWD:
                    held += hold[s]
                    if held > peak:
                        peak = held
                    if multi and held + other > rpeak:
                        rpeak = held + other
                elif work == BWD:
                    top = held + rebuild[s]
                    if top > peak:
                        peak = top
                    if multi and top + other > rpeak:
                        rpeak = top + other
                    held -= hold[s]
                    backward_end[k] = end
                elif work == INPUT:  # a recomputing stage rebuilds its activations here
                    # and from its end holds what W needs instead
                    top = max(held + rebuild[s], held - hold[s] + w_hold[s])
                    if top > peak:
                        peak = top
                    if multi and top + other > rpeak:
                        rpeak = top + other
                    held += w_hold[s] - hold[s]
                elif work == WEIGHT:  # what W needed goes
                    held -= w_hold[s]
                    backward_end[k] = end
                if work:
                    busy_ms[k] += end - start
                    if record:
                        events.append(Event(act, start, end, state + held))  # type: ignore[arg-type]
                    t = end
                if send:
                    if send == SF:
                        end = t + sf_ms[s]
                        arrival = end + delay if end > t else end  # paid transfers only
                        out_f[i] = arrival
                        dst, key = dst_f, wake_f + i
                    else:
                        end = t + sb_ms[s]
                        arrival = end + delay if end > t else end
                        out_b[i] = arrival
                        dst, key = dst_b, wake_b - i
                    comm_ms[k] += end - t
                    if blocked[dst] == key:
                        blocked[dst] = None
                        push(heap, (max(ready[dst], arrival), dst))
                    if record and end > t:
                        events.append(Event(Action(KINDS[send], k, i), t, end,  # type: ignore[arg-type]
                                            state + held))
                    t = end
                if shared[r]:
                    dev_free[rank_dev[r]] = t
                p += 1
            if cur >= 0:
                held_bytes[cur], peak_bytes[cur] = held, peak
            pos[r], ready[r], rank_peak[r] = p, t, rpeak
            host_at[rank_dev[r]] = h


def _result(cm: CostModel, schedule: Schedule, dur: Durations, sim: _Replay,
            optimizer_ms: float, record: bool) -> SimResult:
    """Add the optimizer step: each device steps its stages once all its compute is done."""
    devs, rank_of = sim.devs, schedule.rank_of
    big_k = len(devs)
    stage_end = [sim.ready[rank_of[k]] for k in range(big_k)]
    if dur.allreduce_ms:
        reduced = _allreduce_ends(cm, dur.allreduce_ms, sim, rank_of)
        stage_end = [max(e, r) for e, r in zip(stage_end, reduced, strict=True)]
    total_state = sum(dur.state_bytes)
    share = [s / total_state if total_state > 0 else 1.0 / big_k for s in dur.state_bytes]
    opt = [optimizer_ms * sh for sh in share]
    dev_free = dict.fromkeys(devs, 0.0)
    for k in range(big_k):
        dev_free[devs[k]] = max(dev_free[devs[k]], stage_end[k])
    finish = list(stage_end)
    for k in range(big_k):
        finish[k] = dev_free[devs[k]] = dev_free[devs[k]] + opt[k]
    step = max(finish)
    work = sum(sim.busy) + sum(opt)
    bubble = 1.0 - work / (len(dev_free) * step) if step > 0 else 0.0
    peak_bytes = tuple(dur.state_bytes[k] + sim.peak[k] for k in range(big_k))
    rank_peak = tuple(sum(dur.state_bytes[k] for k in stages) + (
        sim.rank_peak[r] if len(stages) > 1 else sim.peak[stages[0]])
        for r, stages in enumerate(sim.stages_of))
    timeline = None
    if record:
        meta = {"schedule": schedule.name, "model": cm.profile.model,
                "global_batch": cm.global_batch, "microbatches": cm.microbatches,
                "recompute": cm.recompute, "devices": devs, "optimizer_ms": optimizer_ms,
                "step_ms": step, "stage_peak_bytes": list(peak_bytes),
                "stage_activation_peak_bytes": list(sim.peak)}
        if schedule.placement:
            meta["rank_peak_bytes"] = list(rank_peak)
        timeline = Timeline(big_k, tuple(sim.events), "predicted", meta, schedule.placement)
    return SimResult(step, max(bubble, 0.0), tuple(sim.busy), tuple(sim.comm), peak_bytes,
                     timeline, schedule.placement, rank_peak, dur.allreduce_ms,
                     cm.allreduce if dur.allreduce_ms else "", tuple(sim.peak))


def _allreduce_ends(cm: CostModel, allreduce_ms: Sequence[float], sim: _Replay,
                    rank_of: Sequence[int]) -> list[float]:
    """When each stage's all-reduce ends: on its rank's network, one at a time, from its last
    backward (``overlapped``) or from the end of the pipeline's compute (``after``)."""
    big_k = len(rank_of)
    start = sim.backward_end if cm.allreduce == "overlapped" else [max(sim.ready)] * big_k
    net_free = [0.0] * (max(rank_of) + 1)
    ends = [0.0] * big_k
    for k in sorted(range(big_k), key=lambda j: (start[j], j)):
        r = rank_of[k]
        net_free[r] = ends[k] = max(net_free[r], start[k]) + allreduce_ms[k]
    return ends
