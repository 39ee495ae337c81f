"""tools/torch_pipelining.py: torch's default split, placements, refusals, and one timed run of
an exported CSV under torch's runtime on 2 gloo ranks (a tiny model; a few seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from partitioner.schedule.generators import make_schedule
from partitioner.schedule.torchcsv import to_torch_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import torch_pipelining as tp


def test_equal_block_cuts_put_whole_blocks_embedding_first_head_last() -> None:
    assert tp.equal_block_cuts(8, 2) == [0, 9, 18]  # bench_executor's torch-default
    assert tp.equal_block_cuts(8, 4) == [0, 5, 9, 13, 18]
    assert tp.equal_block_cuts(5, 2) == [0, 7, 12]  # the first stage takes the extra block
    assert tp.equal_block_cuts(4, 2, layers_per_block=1) == [0, 3, 6]
    with pytest.raises(ValueError, match="need 1 <= K <= 3"):
        tp.equal_block_cuts(3, 4)


def test_split_and_equal_block_split() -> None:
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(6)))
    parts = tp.equal_block_split(model, blocks=4, stages=2, layers_per_block=1)
    assert [len(p) for p in parts] == [3, 3] and parts[1][0] is model[3]
    with pytest.raises(ValueError, match="make 10 layers, but the model has 6"):
        tp.equal_block_split(model, blocks=4, stages=2)
    with pytest.raises(ValueError, match="must rise strictly"):
        tp.split(model, [0, 4, 4, 6])


def test_placements() -> None:
    assert tp.placement("Schedule1F1B", 2) == (0, 1)
    assert tp.placement("ScheduleInterleaved1F1B", 6) == (0, 1, 0, 1, 0, 1)
    assert tp.placement("ScheduleZBVZeroBubble", 4) == (0, 1, 1, 0)
    assert tp.placement(tp.CSV, 4, to_torch_csv(make_schedule("zbv", 4, 2))) == (0, 1, 1, 0)
    for schedule, k, words in (("ScheduleGPipe", 4, "runs 2 stages, not K=4"),
                               ("ScheduleZBVZeroBubble", 6, "runs 4 stages"),
                               ("ScheduleInterleaved1F1B", 3, "a multiple of 2"),
                               ("ScheduleLoopedBFS", 2, "is not one of"),
                               (tp.CSV, 2, "needs the CSV text")):
        with pytest.raises(ValueError, match=words):
            tp.placement(schedule, k)
    with pytest.raises(ValueError, match="the CSV has K=4 stages on 2 ranks"):
        tp.placement(tp.CSV, 2, to_torch_csv(make_schedule("zbv", 4, 2)))


def test_median_step_ms_refuses_before_spawning() -> None:
    stages = [nn.Linear(2, 2), nn.Linear(2, 2)]
    batch = (torch.randn(6, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="M=4 equal micro-batches"):
        tp.median_step_ms(stages, "ScheduleGPipe", 4, batch, nn.functional.mse_loss)
    with pytest.raises(ValueError, match="schedules M=2 micro-batches, not M=3"):
        tp.median_step_ms(stages, tp.CSV, 3, batch, nn.functional.mse_loss,
                          csv=to_torch_csv(make_schedule("zb-h1", 2, 2)))


@pytest.mark.timeout(120)
def test_an_exported_zb_h1_schedule_runs_and_is_timed() -> None:
    stages = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 4)]
    batch = (torch.randn(8, 4), torch.randn(8, 4))
    ms = tp.median_step_ms(stages, tp.CSV, 4, batch, nn.functional.mse_loss,
                           csv=to_torch_csv(make_schedule("zb-h1", 2, 4)), steps=2,
                           timeout_s=60)
    assert 0 < ms < 10_000
