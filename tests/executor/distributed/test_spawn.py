"""spawn_local: values come back in rank order; a script that spawns ranks without a
``__main__`` guard, or whose ranks die while being prepared, is told why. (Ranks that fail, are
killed or hang, and the grace-period kill, are tested on real pipelines in test_runner.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from executor.distributed.spawn import spawn_local

ROOT = Path(__file__).resolve().parents[3]
GUARD = "if __name__ == '__main__':"


def _identify(offset: int) -> int:
    return offset + dist.get_rank() * 10 + dist.get_world_size()


@pytest.mark.timeout(120)
def test_values_in_rank_order() -> None:
    assert spawn_local(_identify, 2, (100,)) == [102, 112]
    assert "GPIPE_SPAWN_RANK" not in os.environ  # set only while each rank starts


def test_needs_a_rank() -> None:
    with pytest.raises(ValueError, match="world_size=0"):
        spawn_local(_identify, 0)


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=100)


# what the script prints of the parent's RankFailure (its ranks' own tracebacks go to stderr)
REPORT = """
import sys
from executor.distributed.spawn import RankFailure
try:
    print("values", {call})
except RankFailure as exc:
    print("FAILURE", exc)
    sys.exit(3)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("call", [
    "spawn_local(dist.get_rank, 2)",
    "measure_link([8, 64], repeats=1)",  # one of the helpers that spawn ranks for the caller
])
def test_a_script_without_a_main_guard_is_told_to_add_one(tmp_path: Path, call: str) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text("import torch.distributed as dist\n"
                      "from executor.distributed.spawn import spawn_local\n"
                      "from executor.profiling.calibrate import measure_link\n"
                      + REPORT.format(call=call))
    done = _python([str(script)], tmp_path)
    assert done.returncode == 3, (done.stdout, done.stderr[-3000:])
    failure = done.stdout.split("FAILURE", 1)[1]
    for rank in (0, 1):  # each rank's outcome names the cause, the first cause too
        assert (f"rank {rank} raised RuntimeError: spawn_local was called while rank {rank} "
                f"was importing the main module: the calling script has no `{GUARD}` guard"
                ) in failure, failure
    assert failure.count(GUARD) == 3, failure
    assert "spawn_local was called while rank 0 was importing" in done.stderr  # the rank's own


@pytest.mark.timeout(120)
def test_a_script_with_the_guard_spawns(tmp_path: Path) -> None:
    script = tmp_path / "guarded.py"
    script.write_text("import torch.distributed as dist\n"
                      "from executor.distributed.spawn import spawn_local\n"
                      "if __name__ == '__main__':\n"
                      + "".join(f"    {line}\n" for line in REPORT.format(
                          call="spawn_local(dist.get_rank, 2)").strip().splitlines()))
    done = _python([str(script)], tmp_path)
    assert done.returncode == 0, (done.stdout, done.stderr[-3000:])
    assert "values [0, 1]" in done.stdout


@pytest.mark.timeout(120)
def test_a_rank_that_dies_before_running_fn_is_reported_as_such(tmp_path: Path) -> None:
    # fn lives in the __main__ of `python -c`, which a spawned rank cannot import: it fails
    # while unpickling its target, before _rank_main, and without calling spawn_local
    code = ("from executor.distributed.spawn import spawn_local\n"
            "def f():\n    return 1\n" + REPORT.format(call="spawn_local(f, 2)"))
    done = _python(["-c", code], tmp_path)
    assert done.returncode == 3, (done.stdout, done.stderr[-3000:])
    failure = done.stdout.split("FAILURE", 1)[1]
    for rank in (0, 1):
        assert f"rank {rank} exited with status 1 before it started running fn" in failure
    assert GUARD in failure and "stderr" in failure
    assert "was importing the main module" not in failure  # the detection did not fire
    assert "Can't get attribute 'f'" in done.stderr
