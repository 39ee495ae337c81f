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
- Each stage runs its own action list in order (the Schedule is never re-derived). F(k,i)
  takes stage k's forward at micro-batch i's actual size (``split_microbatches``: uneven
  sizes, larger first); B(k,i) takes its backward, plus the forward again when k recomputes.
- Communication. After F(k,i) the stage sends its values on (SF: to k+1, and on a graph
  also what skips ahead to later stages; each value once per stage that reads it), after
  B(k,i) the gradients of the values it received back (SB; values without gradient send
  none); a send *occupies the sender* for ``latency + bytes / bandwidth`` per transfer and a
  receive takes no time but waits until the previous stage's send has finished. So a stage
  is occupied compute + comm_in + comm_out per micro-batch, exactly the partitioners' stage
  time (their bottleneck is the simulated throughput limit), and free communication gives
  the paper's closed forms. Stages on the same device exchange tensors for free.
- Devices. Stages that share a device run one action at a time; when the device frees, the
  action that has been ready longest runs (ties: the lower stage). An optional optimizer step
  (``optimizer_ms`` for the whole model, split by parameter bytes) ends each stage once its
  device has finished all its compute (the flush at the end of a GPipe step).
- Memory, replayed per stage: weights + gradients + optimizer state (with the copies of tied
  parameters whose owner is in another stage), plus per micro-batch in flight its saved
  activations, or, when the stage recomputes, its stashed inputs, with one micro-batch's saved
  activations on top while B rebuilds and consumes them. This is
  ``CostModel.stage_memory_bytes``'s (and the graph evaluator's) closed form wherever both
  describe the same step.
- The predicted Timeline holds the compute actions and the sends that take time (receives
  are instants: their waiting shows as the gap before the action that needed them).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from partitioner.cost.model import CostModel
from partitioner.formats.layers import (
    assignment_problems,
    layer_edges,
    range_problems,
    stage_of_nodes,
)
from partitioner.formats.timeline import Event, Timeline
from partitioner.schedule.generators import make_schedule
from partitioner.schedule.ir import Action, Schedule, ScheduleError, validate
from partitioner.simulator.durations import Durations, IntArray, stage_durations, stage_of_ranges

__all__ = ["SimResult", "device_indices", "ranges_from_boundaries", "simulate"]

_RF, _F, _SF, _RB, _B, _SB = range(1, 7)  # 0: nothing
_CODE = {"RF": _RF, "F": _F, "SF": _SF, "RB": _RB, "B": _B, "SB": _SB}
_KIND = ("", "RF", "F", "SF", "RB", "B", "SB")
# One step of a stage: (receive, compute, send, micro-batch, the compute's Action). A compute
# carries the receive just before it and the send just after it (as ``lower`` places them),
# so that the event loop turns once per compute action; codes are 0 where there is none.
Op = tuple[int, int, int, int, "Action | None"]


@dataclass(frozen=True)
class SimResult:
    """Figures of one simulated training step (times in ms from the step's start)."""

    step_ms: float  # first action's start to the last stage's end (optimizer step included)
    bubble_fraction: float  # 1 - (compute + optimizer) / (devices x step): idle or sending
    stage_busy_ms: tuple[float, ...]  # per stage, F + B (+ recompute), as Timeline counts it
    stage_comm_ms: tuple[float, ...]  # per stage, time spent sending
    stage_peak_bytes: tuple[float, ...]  # per stage, replayed peak memory
    timeline: Timeline | None  # None when simulate(..., record=False)


def ranges_from_boundaries(boundaries: Sequence[int]) -> list[tuple[int, int]]:
    """``[(0, 7), (7, 26)]`` from cut points ``(0, 7, 26)``."""
    return [(boundaries[k], boundaries[k + 1]) for k in range(len(boundaries) - 1)]


def device_indices(devices: Sequence[str]) -> list[int]:
    """Which stages share a device, from a plan's device names: equal names with an index
    (``cuda:0``) are one device; a name without one (``cpu``) is a device of the stage's own
    (each stage its own process, as the distributed runner places them).

        >>> device_indices(["cuda:0", "cuda:0", "cuda:1"]), device_indices(["cpu", "cpu"])
        ([0, 0, 1], [0, 1])
    """
    index: dict[str, int] = {}
    out = []
    for k, name in enumerate(devices):
        key = name if ":" in name else f"{name}#{k}"
        out.append(index.setdefault(key, len(index)))
    return out


def _ops(sched: Schedule) -> list[list[Op]]:
    """Per stage, the schedule's actions as ``Op`` steps. A plain schedule gets the receives
    and sends that ``lower`` would add, and is checked here in one cheap pass (each
    micro-batch's F once, then its B once, on the right stage); a lowered one is validated in
    full. Anything wrong is reported by ``validate``, with the grid."""
    if sched.is_lowered:
        validate(sched)
        return [_fold([(_CODE[a.kind], a.microbatch, a) for a in row]) for row in sched.actions]
    last, m = sched.stages - 1, sched.microbatches
    out = []
    for k, row in enumerate(sched.actions):
        ops: list[Op] = []
        state = [0] * m  # 0: nothing yet, 1: F done, 2: B done
        for a in row:
            i = a.microbatch
            if a.stage != k or not 0 <= i < m or state[i] != (0 if a.kind == "F" else 1):
                validate(sched)
            if a.kind == "F":
                state[i] = 1
                ops.append((_RF if k > 0 else 0, _F, _SF if k < last else 0, i, a))
            else:
                state[i] = 2
                ops.append((_RB if k < last else 0, _B, _SB if k > 0 else 0, i, a))
        if any(x != 2 for x in state):
            validate(sched)
        out.append(ops)
    return out


def _fold(row: list[tuple[int, int, Action]]) -> list[Op]:
    """Attach each receive to the compute right after it and each send to the compute right
    before it (same micro-batch, matching direction); others stay steps of their own."""
    ops: list[Op] = []
    j = 0
    while j < len(row):
        code, i, a = row[j]
        recv = 0
        if code in (_RF, _RB) and j + 1 < len(row) and row[j + 1][:2] == (code + 1, i):
            recv, (code, i, a) = code, row[j + 1]
            j += 1
        if code in (_F, _B) and j + 1 < len(row) and row[j + 1][:2] == (code + 1, i):
            ops.append((recv, code, code + 1, i, a))
            j += 2
        elif code in (_F, _B):
            ops.append((recv, code, 0, i, a))
            j += 1
        else:
            ops.append((code, 0, 0, i, None) if code in (_RF, _RB) else (0, 0, code, i, None))
            j += 1
    return ops


def simulate(
    cm: CostModel,
    ranges: Sequence[tuple[int, int]] | None = None,
    schedule: Schedule | None = None,
    devices: Sequence[int] | None = None,
    optimizer_ms: float = 0.0,
    record: bool = True,
    *,
    nodes: Sequence[Sequence[int]] | None = None,
) -> SimResult:
    """Replay ``schedule`` (default: ``cm.schedule`` for K stages, M) on stages holding layers
    ``ranges[k] = (start, end)``, or the layer-graph nodes ``nodes[k]`` (convex sets; give one
    of the two); ``devices[k]``: stage k's device (default: its own).

        >>> from partitioner import CostModel, load_profile
        >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=2)
        >>> simulate(cm, [(0, 13), (13, 26)], devices=[0, 0]).bubble_fraction  # one device
        0.0
        >>> cm = CostModel(load_profile("pipedream/resnet18"), 4, 4, stages=2)
        >>> round(simulate(cm, nodes=[range(35), range(35, 70)]).step_ms, 1)
        828.0
    """
    m = cm.microbatches
    stage_of = _check_inputs(cm, ranges, nodes, devices, optimizer_ms)
    big_k = cm.stages
    if schedule is None:
        schedule = make_schedule(cm.schedule, big_k, m)
    elif (schedule.stages, schedule.microbatches) != (big_k, m):
        raise ValueError(f"schedule {schedule.name!r} is for K={schedule.stages}, "
                         f"M={schedule.microbatches} but the plan has K={big_k}, M={m}; "
                         f"make the schedule with make_schedule(name, {big_k}, {m})")
    devs = list(range(big_k)) if devices is None else list(devices)
    dur = stage_durations(cm, stage_of, devs)
    all_ops = _ops(schedule)
    sim = _Replay(big_k, m, devs, dur, record)
    sim.run(all_ops)
    if any(sim.pos[k] < len(all_ops[k]) for k in range(big_k)):
        validate(schedule)  # names the deadlock with the grid
        raise ScheduleError(f"schedule {schedule.name!r} did not finish in the simulation")
    return _result(cm, schedule, dur, sim, optimizer_ms, record)


class _Replay:
    """The event loop's state. A heap holds (time a stage can go on, stage); a stage runs its
    steps until a receive finds no matching send yet (the sender pushes it back when it
    sends) or, on a shared device, after each step (so the device serves stages in order of
    readiness). Popped times never decrease, which is what makes both rules exact."""

    def __init__(self, big_k: int, m: int, devs: list[int], dur: Durations,
                 record: bool) -> None:
        self.m, self.devs, self.dur, self.record = m, devs, dur, record
        self.arrived = {_SF: [[-1.0] * m for _ in range(big_k)],  # [k][i]: k's output of i
                        _SB: [[-1.0] * m for _ in range(big_k)]}  # reached k+1 / k-1
        self.pos, self.ready = [0] * big_k, [0.0] * big_k
        self.busy, self.comm = [0.0] * big_k, [0.0] * big_k
        self.held, self.peak = [0.0] * big_k, [0.0] * big_k
        self.events: list[Event] = []

    def run(self, all_ops: list[list[Op]]) -> None:
        dur, size, devs, m, record = self.dur, self.dur.size_index, self.devs, self.m, self.record
        arrived_f, arrived_b = self.arrived[_SF], self.arrived[_SB]
        pos, ready, busy_ms, comm_ms = self.pos, self.ready, self.busy, self.comm
        held_bytes, peak_bytes, events = self.held, self.peak, self.events
        dev_free = dict.fromkeys(devs, 0.0)
        shared = [devs.count(d) > 1 for d in devs]
        send_ms = [{_SF: dur.send_f_ms[k], _SB: dur.send_b_ms[k]} for k in range(len(devs))]
        delay = dur.message_ms
        blocked = [-1] * len(devs)  # recv code * m + i of the receive a stage waits for
        heap = [(0.0, k) for k in range(len(all_ops))]
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            t, k = pop(heap)
            ops, p, n, first = all_ops[k], pos[k], len(all_ops[k]), True
            f_ms, b_ms, sends, hold = dur.fwd_ms[k], dur.bwd_ms[k], send_ms[k], dur.hold_bytes[k]
            rebuild = dur.rebuild_bytes[k]
            held, peak, state = held_bytes[k], peak_bytes[k], dur.state_bytes[k]
            while p < n:
                recv, work, send, i, act = ops[p]
                if recv:
                    arrival = arrived_f[k - 1][i] if recv == _RF else arrived_b[k + 1][i]
                    if arrival < 0:  # no matching send yet: its sender will push k back
                        blocked[k] = recv * m + i
                        break
                    if arrival > t:
                        t = arrival
                    if not (work or send):
                        p += 1
                        continue
                if shared[k]:
                    if not first:  # queue for the device in order of readiness
                        push(heap, (t, k))
                        break
                    t = max(t, dev_free[devs[k]])
                first = False
                s = size[i]
                if work == _F:
                    end = t + f_ms[s]
                    held += hold[s]
                    if held > peak:
                        peak = held
                elif work == _B:
                    end = t + b_ms[s]
                    if held + rebuild[s] > peak:
                        peak = held + rebuild[s]
                    held -= hold[s]
                if work:
                    busy_ms[k] += end - t
                    if record:
                        events.append(Event(act, t, end, state + held))  # type: ignore[arg-type]
                    t = end
                if send:
                    end = t + sends[send][s]
                    comm_ms[k] += end - t
                    arrival = end + delay if end > t else end  # paid transfers only
                    if send == _SF:
                        arrived_f[k][i] = arrival
                        dst = k + 1
                    else:
                        arrived_b[k][i] = arrival
                        dst = k - 1
                    if blocked[dst] == (send - 2) * m + i:  # SF wakes RF, SB wakes RB
                        blocked[dst] = -1
                        push(heap, (max(ready[dst], arrival), dst))
                    if record and end > t:
                        events.append(Event(Action(_KIND[send], k, i), t, end,  # type: ignore[arg-type]
                                            state + held))
                    t = end
                if shared[k]:
                    dev_free[devs[k]] = t
                p += 1
            pos[k], ready[k], held_bytes[k], peak_bytes[k] = p, t, held, peak


def _as_ranges(nodes: Sequence[Sequence[int]]) -> list[tuple[int, int]] | None:
    """The node sets as layer ranges when each is a contiguous run following the one before
    (a chain split), else None."""
    ranges, expect = [], 0
    for members in nodes:
        end = expect + len(members)
        if len(members) == 0 or list(members) != list(range(expect, end)):
            return None
        ranges.append((expect, end))
        expect = end
    return ranges


def _check_inputs(cm: CostModel, ranges: Sequence[tuple[int, int]] | None,
                  nodes: Sequence[Sequence[int]] | None, devices: Sequence[int] | None,
                  optimizer_ms: float) -> IntArray:
    """Every problem with the stages, devices and optimizer time at once; the stage of each
    layer when there is none."""
    problems = []
    num_layers = cm.profile.num_layers
    if (ranges is None) == (nodes is None):
        raise ValueError("give the stages either as layer ranges or as nodes=, not "
                         + ("both" if ranges is not None else "neither"))
    stages = ranges if ranges is not None else nodes
    assert stages is not None
    if len(stages) != cm.stages:
        what = "stage ranges" if ranges is not None else "node sets"
        problems.append(f"{len(stages)} {what} given but the cost model has K={cm.stages}; "
                        f"build it with stages={len(stages)}")
    stage_of = None
    if ranges is not None:
        problems += range_problems(ranges, num_layers)
        if not problems:
            stage_of = stage_of_ranges(ranges)
    elif nodes is not None and (chain := _as_ranges(nodes)) is not None:  # no graph check
        problems += range_problems(chain, num_layers)
        if not problems:
            stage_of = stage_of_ranges(chain)
    elif nodes is not None:
        try:
            owner = stage_of_nodes(nodes)
        except ValueError as exc:
            problems.append(str(exc))
        else:
            graph_problems = assignment_problems(num_layers, layer_edges(cm.profile), owner,
                                                 len(nodes))
            problems += graph_problems
            if not graph_problems:
                stage_of = np.asarray(owner, dtype=np.int64)
    if devices is not None and len(devices) != len(stages):
        problems.append(f"{len(devices)} devices given for K={len(stages)} stages; give one "
                        f"device index per stage")
    if not (optimizer_ms >= 0 and math.isfinite(optimizer_ms)):
        problems.append(f"optimizer_ms={optimizer_ms} must be a finite number >= 0")
    if problems or stage_of is None:
        raise ValueError("cannot simulate:\n  " + "\n  ".join(problems))
    return stage_of


def _result(cm: CostModel, schedule: Schedule, dur: Durations, sim: _Replay,
            optimizer_ms: float, record: bool) -> SimResult:
    """Add the optimizer step: each device steps its stages once all its compute is done."""
    devs, stage_end = sim.devs, sim.ready
    big_k = len(devs)
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
    timeline = None
    if record:
        meta = {"schedule": schedule.name, "model": cm.profile.model,
                "global_batch": cm.global_batch, "microbatches": cm.microbatches,
                "recompute": cm.recompute, "devices": devs, "optimizer_ms": optimizer_ms,
                "step_ms": step, "stage_peak_bytes": list(peak_bytes)}
        timeline = Timeline(big_k, tuple(sim.events), "predicted", meta)
    return SimResult(step, max(bubble, 0.0), tuple(sim.busy), tuple(sim.comm), peak_bytes,
                     timeline)
