"""Faults, measured: each kind of failure on two local ranks, how long the run took to end, what
it said, and whether a resume from the last checkpoint gives the uninterrupted run's losses.

    PYTHONPATH=. python tools/bench_faults.py                       # every kind, ~2 minutes
    PYTHONPATH=. python tools/bench_faults.py --kinds hang,wrong-shape

The job is the demo MLP with Adam under a K=2 1F1B plan (M=4, B=16), 6 steps, a checkpoint
after every step; ``executor.workloads.faults`` makes rank 1 fail in step 3 (a kill in a
forward, in a backward, in a send, or while saving the checkpoint after step 3; a hang), or
rank 0 send rank 1 an output one column wider. For each kind: the faulty run
(``partition-model run``, ``--timeout-s 10``) must end every rank within 60 s with exit status
2 and an error that names the faulty rank; then ``--resume`` from the checkpoint directory runs the steps left, and its
losses, step by step, must equal the uninterrupted run's bit for bit. The last line is
``cases=N ended_in_60s=N named=N resumed_equal=N``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from executor.runtime.pipeline import manual_plan
from executor.workloads.faults import KINDS
from partitioner.formats.plan import save_plan

STEPS, FAULT_STEP, TIMEOUT_S = 6, 3, 10


def _run(plan: Path, metrics: Path, *more: str, fault: str | None = None
         ) -> tuple[int, float, str]:
    env = {k: v for k, v in os.environ.items() if k != "GPIPE_FAULT"}
    if fault:
        env["GPIPE_FAULT"] = fault
    cmd = [sys.executable, "-m", "partitioner.cli", "run", "--job",
           "executor.workloads.faults:job", "--plan", str(plan), "--steps", str(STEPS),
           "--timeout-s", str(TIMEOUT_S), "--metrics", str(metrics), *more]
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    return done.returncode, time.monotonic() - start, done.stderr


def _losses(path: Path) -> dict[int, float]:
    """Step -> loss (a step written twice, before a crash and after a resume: the later)."""
    out: dict[int, float] = {}
    for line in path.read_text().splitlines():
        got = json.loads(line)
        out[got["step"]] = got["loss"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--kinds", default=",".join(KINDS), help="fault kinds to run")
    args = p.parse_args(argv)
    kinds = args.kinds.split(",")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise SystemExit(f"--kinds: {', '.join(bad)} not one of {', '.join(KINDS)}")
    with tempfile.TemporaryDirectory(prefix="gpipe-faults-") as tmp_name:
        tmp = Path(tmp_name)
        plan = tmp / "plan.json"
        save_plan(manual_plan([0, 3, 7], 4, 16, "1f1b", "never"), plan)
        code, _, err = _run(plan, tmp / "whole.jsonl")
        if code:
            raise SystemExit(f"the uninterrupted run failed:\n{err[-2000:]}")
        whole = _losses(tmp / "whole.jsonl")
        print(f"{'fault':>15} {'exit':>4} {'ended_s':>7} {'named':>5} {'resumed':>7} "
              f"{'equal':>5}  the error's first cause")
        counts = {"ended_in_60s": 0, "named": 0, "resumed_equal": 0}
        for kind in kinds:
            ckpt, metrics = tmp / f"{kind}-ckpt", tmp / f"{kind}.jsonl"
            faulty = 0 if kind == "wrong-shape" else 1  # rank 0 sends to rank 1
            code, ended, err = _run(plan, metrics, "--checkpoint-dir", str(ckpt),
                                    "--checkpoint-every", "1",
                                    fault=f"{kind}@{faulty}:{FAULT_STEP}")
            lines = [x for x in err.splitlines() if "error" in x.lower()] or err.splitlines()
            first = lines[0].split("first cause: ")[-1][:200] if lines else ""
            named = code == 2 and f"rank {faulty}" in err
            resumed, equal = "-", False
            if code == 2:
                again, _, rerr = _run(plan, metrics, "--resume", str(ckpt))
                resumed = "ok" if again == 0 else f"exit {again}"
                equal = again == 0 and _losses(metrics) == whole
                if again:
                    first += f" | resume: {rerr.splitlines()[-1][:100] if rerr else ''}"
            counts["ended_in_60s"] += code == 2 and ended < 60
            counts["named"] += named
            counts["resumed_equal"] += equal
            print(f"{kind:>15} {code:>4} {ended:>7.1f} {'yes' if named else 'no':>5} "
                  f"{resumed:>7} {'yes' if equal else 'no':>5}  {first}")
    print(f"cases={len(kinds)} " + " ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
