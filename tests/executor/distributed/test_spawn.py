"""spawn_local: values come back in rank order. (Ranks that fail, are killed or hang, and the
grace-period kill, are tested on real pipelines in test_runner.py.)"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from executor.distributed.spawn import spawn_local


def _identify(offset: int) -> int:
    return offset + dist.get_rank() * 10 + dist.get_world_size()


@pytest.mark.timeout(120)
def test_values_in_rank_order() -> None:
    assert spawn_local(_identify, 2, (100,)) == [102, 112]


def test_needs_a_rank() -> None:
    with pytest.raises(ValueError, match="world_size=0"):
        spawn_local(_identify, 0)
