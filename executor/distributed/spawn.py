"""Spawn local CPU ranks (gloo on 127.0.0.1, a free port) for tests and demos, and watch them.

    values = spawn_local(train_rank, world_size=2, args=(plan_path,))
    # train_rank(plan_path) runs on ranks 0 and 1 after init_process_group; values[k] is rank
    # k's return value. If a rank raises or dies, every rank ends and RankFailure says how.

The parent owns the rendezvous store (bound to a free port it was given by the OS), so there is no
race for a port. Each rank runs ``fn(*args)`` with torch limited to ``threads`` threads, writes
its return value (or its error) to a private temporary folder, and exits. When one rank fails,
the others end on their own within moments (their peer's connections close) or at the process
group timeout; any still alive after ``grace_s`` more seconds are killed. Only the processes
started here are ever signalled.

Ranks are started with "spawn": each child imports the calling script's main module before it
runs ``fn``. A script that spawns ranks at top level, without ``if __name__ == "__main__":``,
would spawn again from there; multiprocessing refuses in the child, and the parent would see
only a rank that exited without a result. So the parent tells each child its rank and result
folder, in an environment variable set while it starts: ``spawn_local`` called in a child still
being prepared writes that rank's error, naming the missing guard, and RankFailure shows it. A
rank that exits before it began running ``fn`` (it writes a marker first) is reported as such.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankFailure", "spawn_local"]

_ENV = "GPIPE_SPAWN_RANK"  # "parent pid:rank:result folder", set while the parent starts a rank
_GUARD = "if __name__ == '__main__':"


class RankFailure(RuntimeError):
    """One or more ranks failed; ``outcomes[k]`` says how rank k ended."""

    def __init__(self, message: str, outcomes: Sequence[str]) -> None:
        super().__init__(message)
        self.outcomes = list(outcomes)


def _rank_main(rank: int, world_size: int, port: int, fn: Callable[..., Any],
               args: tuple[Any, ...], threads: int, timeout_s: float, out_dir: str) -> None:
    out = Path(out_dir)
    (out / f"{rank}.started").touch()
    try:
        torch.set_num_threads(threads)
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, False,  # type: ignore[attr-defined]
                              timeout=timedelta(seconds=timeout_s))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        value = fn(*args)
        dist.barrier()  # leave together: a rank that exits at once could cut a slower peer's
        # connection set-up short
        (out / f"{rank}.tmp").write_bytes(pickle.dumps(value))
        os.replace(out / f"{rank}.tmp", out / f"{rank}.ok")
    except BaseException as exc:  # report anything, then leave at once: peers see us go
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        notes = [str(n) for n in getattr(exc, "__notes__", ())]  # e.g. the action it ran
        first = text.splitlines()[0] + (f" [{'; '.join(notes)}]" if notes else "")
        tb = "".join(traceback.format_tb(exc.__traceback__)[-3:])
        (out / f"{rank}.err").write_text(f"{first}\n{text}\n{tb}")
        os._exit(1)
    dist.destroy_process_group()


def _refuse_while_bootstrapping() -> None:
    """Raise (after writing that rank's error) if this process is a rank spawned by us that is
    still being prepared: its parent set ``_ENV`` for it, and multiprocessing has not yet
    bootstrapped it (``parent_process()`` is set only then, after the main module's import)."""
    pid, _, rest = os.environ.get(_ENV, "").partition(":")
    rank, _, out_dir = rest.partition(":")
    if not out_dir or pid != str(os.getppid()) or mp.parent_process() is not None:
        return
    message = (f"spawn_local was called while rank {rank} was importing the main module: the "
               f"calling script has no `{_GUARD}` guard; put the code that spawns ranks under it")
    with contextlib.suppress(OSError):  # the parent may have gone and taken the folder
        (Path(out_dir) / f"{rank}.err").write_text(f"RuntimeError: {message}\n")
    raise RuntimeError(message)


def _outcome(rank: int, proc: Any, out: Path, killed: set[int]) -> tuple[bool, str]:
    err = out / f"{rank}.err"
    if err.exists():
        return False, f"rank {rank} raised {err.read_text().splitlines()[0]}"
    if (out / f"{rank}.ok").exists():
        return True, f"rank {rank} finished"
    if rank in killed:
        return False, f"rank {rank} was still running after the grace period and was killed"
    code = proc.exitcode
    if code is not None and code < 0:
        return False, f"rank {rank} was killed by signal {signal.Signals(-code).name}"
    if not (out / f"{rank}.started").exists():
        return False, (f"rank {rank} exited with status {code} before it started running fn, "
                       f"while it was being prepared (importing the main module, unpickling fn "
                       f"and its args; its traceback is in stderr): likely a script that spawns "
                       f"ranks without an `{_GUARD}` guard, or an fn the rank cannot import")
    return False, f"rank {rank} exited with status {code} without a result"


def spawn_local(fn: Callable[..., Any], world_size: int, args: tuple[Any, ...] = (), *,
                threads: int = 1, timeout_s: float = 60.0, grace_s: float = 30.0,
                deadline_s: float | None = None) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local CPU ranks (``fn`` must be importable, e.g. a
    module-level function); return the values in rank order. ``timeout_s``: the process
    group's timeout (a hung peer is detected after it); ``deadline_s``: kill all ranks if the
    whole run takes longer. Raises RankFailure naming how each rank ended. A script calls it
    (or a helper that spawns ranks) under ``if __name__ == "__main__":``; see the module doc."""
    _refuse_while_bootstrapping()
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: need at least one rank")
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, True,  # type: ignore[attr-defined]
                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="gpipe-ranks-") as tmp:
        out = Path(tmp)
        procs = [ctx.Process(target=_rank_main, name=f"gpipe-rank-{r}",
                             args=(r, world_size, store.port, fn, args, threads, timeout_s, tmp))
                 for r in range(world_size)]
        before = os.environ.get(_ENV)  # set if this is itself a rank that spawns
        try:
            for r, p in enumerate(procs):
                os.environ[_ENV] = f"{os.getpid()}:{r}:{tmp}"  # the child inherits it
                p.start()
        finally:
            if before is None:
                del os.environ[_ENV]
            else:
                os.environ[_ENV] = before
        killed = _watch(procs, out, grace_s, deadline_s)
        results = [_outcome(r, p, out, killed) for r, p in enumerate(procs)]
        if all(ok for ok, _ in results):
            return [pickle.loads((out / f"{r}.ok").read_bytes()) for r in range(world_size)]
    failed = [text for ok, text in results if not ok]
    first = next((t for t in failed if "raised" in t and "PeerError" not in t
                  and "RankFailure" not in t), failed[0])
    raise RankFailure(f"{len(failed)} of {world_size} ranks failed; first cause: {first}\n  "
                      + "\n  ".join(text for _, text in results), [t for _, t in results])


def _watch(procs: Sequence[Any], out: Path, grace_s: float,
           deadline_s: float | None) -> set[int]:
    """Wait for every rank; once one fails, give the rest ``grace_s`` to end, then kill them."""
    start = time.monotonic()
    kill_at = start + deadline_s if deadline_s is not None else float("inf")
    killed: set[int] = set()
    while any(p.is_alive() for p in procs):
        failed = any(p.exitcode not in (None, 0) for p in procs) or any(out.glob("*.err"))
        if failed:
            kill_at = min(kill_at, time.monotonic() + grace_s)
        if time.monotonic() >= kill_at:
            for r, p in enumerate(procs):
                if p.is_alive():
                    p.kill()
                    killed.add(r)
            break
        time.sleep(0.05)
    for p in procs:
        p.join()
    return killed
