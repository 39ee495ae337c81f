"""What a simulation is given, checked at the boundary: the stages, their devices, the optimizer.

    >>> from partitioner import CostModel, load_profile
    >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=2)
    >>> check_stages(cm, [(0, 13), (13, 26)], None, None, 0.0)[[0, 12, 13, 25]].tolist()
    [0, 0, 1, 1]

Every problem is collected before one ValueError names them all: stages as layer ranges or as
node sets of the layer graph (convex, non-empty, covering each layer once), one device index
per stage, a finite optimizer time, and a rank's stages on one device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from partitioner.cost.model import CostModel
from partitioner.formats.layers import (
    assignment_problems,
    layer_edges,
    range_problems,
    stage_of_nodes,
)
from partitioner.schedule.ir import Schedule
from partitioner.simulator.durations import IntArray, stage_of_ranges

__all__ = ["check_rank_devices", "check_stages"]


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


def check_stages(cm: CostModel, ranges: Sequence[tuple[int, int]] | None,
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



def check_rank_devices(schedule: Schedule, devs: list[int]) -> None:
    """A rank is one device: refuse devices that put its stages on several."""
    problems = []
    for r in range(schedule.ranks):
        stages = [k for k, rank in enumerate(schedule.rank_of) if rank == r]
        if len({devs[k] for k in stages}) > 1:
            problems.append(f"rank {r} runs stages {stages}, but devices "
                            f"{[devs[k] for k in stages]} put them on different devices; a "
                            f"rank is one device: give its stages one device index")
    if problems:
        raise ValueError("cannot simulate:\n  " + "\n  ".join(problems))
