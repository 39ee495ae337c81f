"""Layout-free checkpoints: every rank saves its own stages, under the model's own names.

    save_checkpoint("ckpt", step=100, runner=runner, optimizer=opt, plan=plan)  # every rank
    step = load_checkpoint("ckpt", runner, opt)  # any plan: the newest committed checkpoint

A checkpoint is a folder ``DIR/step-00000100`` written by ``torch.distributed.checkpoint``:
each rank writes its part (no gathering on rank 0), the parameters of its stages as
``model.<name>`` and its optimizer's state as ``optim.<name>.<key>``, ``<name>`` being the
parameter's name in the user's model (``DistributedRunner.named_parameters``), so another plan
(other K, cuts, schedule, replicas) loads the same keys onto its own ranks. A replicated copy
(D > 1) is written once. Each rank's RNG state goes beside it (``rng-rank<r>.pt``: restored when
the world is the same size, for a bit-exact resume). A checkpoint is complete or absent: it is
written under a hidden temporary name, then rank 0 writes ``manifest.json`` (format, step, the
plan, the world size, every file's sha256) and renames the folder into place, atomically. A
rank killed during a save leaves only the temporary folder, which loading ignores; a committed
checkpoint whose files do not match its manifest is refused, naming the file.

The optimizer's state is matched to parameters by name; its settings (learning rate, betas)
are the optimizer's own, as the job builds it. A ZeRO-1 optimizer (``replicas.sharded``)
saves, from each copy, the state of the parameters it owns, and loads the state of those it
owns under the new plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.optim import ZeroRedundancyOptimizer

from executor.distributed.transport import PeerError
from partitioner.formats.plan import Plan, plan_to_dict

__all__ = ["FORMAT", "MANIFEST", "CheckpointError", "check_checkpoint", "latest_checkpoint",
           "load_checkpoint", "save_checkpoint"]

FORMAT = "gpipe-checkpoint/1"
MANIFEST = "manifest.json"
_PY = "#py"  # suffix of a state value that was a Python number, saved as a 0-d tensor


class CheckpointError(ValueError):
    """A checkpoint that is missing, partial or damaged (the message names the file)."""


def _local_optimizer(optimizer: Any) -> Any:
    """The optimizer whose ``state`` holds this rank's tensors (ZeRO-1: its own shard's)."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _owned(optimizer: Any, params: dict[str, torch.nn.Parameter]) -> dict[str, Any]:
    """The parameters (by name) whose optimizer state this rank keeps."""
    if optimizer is None:
        return {}
    local = _local_optimizer(optimizer)
    mine = {id(p) for group in local.param_groups for p in group["params"]}
    return {name: p for name, p in params.items() if id(p) in mine}


def _state_dict(runner: Any, optimizer: Any) -> dict[str, Any]:
    params = runner.named_parameters()
    out: dict[str, Any] = {f"model.{name}": p.detach() for name, p in params.items()}
    if optimizer is not None:
        state = _local_optimizer(optimizer).state
        for name, p in _owned(optimizer, params).items():
            for key, value in state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"optim.{name}.{key}"] = value
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"optim.{name}.{key}{_PY}"] = torch.tensor(float(value),
                                                                   dtype=torch.float64)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(root: str | os.PathLike[str], step: int, runner: Any, optimizer: Any,
                    plan: Plan) -> Path:
    """On every rank (a collective): write the checkpoint of ``step`` (steps completed) under
    ``root``; returns its folder. See the module text."""
    rank = dist.get_rank()
    root = Path(root)
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died before
        tmp.mkdir()
    try:
        dist.barrier()
        dcp_save(_state_dict(runner, optimizer), checkpoint_id=str(tmp))
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / f"rng-rank{rank}.pt")
        dist.barrier()
    except RuntimeError as exc:  # a rank died or hangs: the checkpoint stays uncommitted
        raise PeerError(f"rank {rank}: saving the checkpoint of step {step} in {str(tmp)!r} "
                        f"failed ({str(exc).splitlines()[0][:120] if str(exc) else type(exc)}); "
                        f"another rank has probably failed, been killed or hung; the last "
                        f"committed checkpoint under {str(root)!r} stays loadable") from exc
    if rank == 0:
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT, "step": step, "world_size": dist.get_world_size(),
                    "plan": plan_to_dict(plan), "files": files}
        with (tmp / MANIFEST).open("w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = root / f".step-{step:08d}.old"  # a checkpoint of this step saved before
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)  # the commit: the folder appears whole or not at all
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def latest_checkpoint(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it is a checkpoint (it has a manifest), else its newest committed
    ``step-*`` checkpoint; CheckpointError when there is none."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    steps = sorted(p for p in path.glob("step-*") if (p / MANIFEST).is_file()) if path.is_dir(
        ) else []
    if not steps:
        raise CheckpointError(f"no checkpoint in {str(path)!r}: it holds no step-*/{MANIFEST} "
                              f"(a save that died leaves only a .partial folder); give a "
                              f"--checkpoint-dir a run wrote, or start without --resume")
    return steps[-1]


def check_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the checkpoint ``latest_checkpoint(path)`` finds, after checking every
    file it lists against its sha256 (CheckpointError, naming the file, when one does not
    match): what ``launch`` checks before it starts any rank."""
    return _manifest(latest_checkpoint(path))


def _manifest(folder: Path) -> dict[str, Any]:
    """The manifest, after checking every file it lists against its sha256."""
    try:
        manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(folder)!r}: {MANIFEST} is unreadable "
                              f"({exc}); it is damaged: resume from another checkpoint") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(folder)!r}: {MANIFEST} has format "
                              f"{manifest.get('format')!r}, not {FORMAT!r}")
    for name, digest in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {str(folder)!r} is partial: {name} is missing; "
                                  f"resume from another checkpoint")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint {str(folder)!r} is damaged: {name} does not "
                                  f"match its sha256 in {MANIFEST}; resume from another "
                                  f"checkpoint")
    return manifest


def load_checkpoint(path: str | os.PathLike[str], runner: Any, optimizer: Any,
                    verify: bool = True) -> int:
    """On every rank (a collective): load this rank's parameters and optimizer state from the
    checkpoint at ``path`` (see ``latest_checkpoint``), whatever plan wrote it, and its RNG
    state when the world has the size it had; returns the step to continue from. ``verify``:
    rank 0 checks every file's sha256 first (once for all ranks; ``launch`` checks before it
    spawns local ranks, and tells them not to again)."""
    folder = latest_checkpoint(path)
    problem: list[str | None] = [None]
    if verify and dist.get_rank() == 0:
        try:
            _manifest(folder)
        except CheckpointError as exc:
            problem = [str(exc)]
    if verify:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise CheckpointError(problem[0])
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    params = runner.named_parameters()
    known = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    missing = [name for name in params if f"model.{name}" not in known]
    if missing:
        raise CheckpointError(f"checkpoint {str(folder)!r} has no parameter "
                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
                              f"it was written for another model")
    owned = _owned(optimizer, params)
    state: dict[str, Any] = {f"model.{name}": p.detach() for name, p in params.items()}
    slots: dict[str, tuple[str, str]] = {}  # checkpoint key -> (parameter, state key)
    for key, meta in known.items():
        if not key.startswith("optim.") or not isinstance(meta, TensorStorageMetadata):
            continue
        name, _, slot = key[len("optim."):].rpartition(".")
        if name in owned:
            state[key] = torch.empty(meta.size, dtype=meta.properties.dtype,
                                     device=owned[name].device if meta.size else "cpu")
            slots[key] = (name, slot)
    with torch.no_grad():
        dcp_load(state, checkpoint_id=str(folder))
    if optimizer is not None:
        local = _local_optimizer(optimizer)
        for key, (name, slot) in slots.items():
            value: Any = state[key]
            if slot.endswith(_PY):
                slot, value = slot[: -len(_PY)], value.item()
            local.state.setdefault(owned[name], {})[slot] = value
    if manifest["world_size"] == dist.get_world_size():
        rng = torch.load(folder / f"rng-rank{dist.get_rank()}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    step: int = manifest["step"]
    return step
