"""The torch side of gpipe-planner: profile a model, and run a plan as pipelined training.

    >>> import torch
    >>> from executor import Pipeline, manual_plan
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> pipe = Pipeline(model, manual_plan([0, 1, 3], microbatches=2, global_batch=4))
    >>> float(pipe.train_step(torch.ones(4, 4), torch.zeros(4, 1), torch.nn.MSELoss())) >= 0
    True

The front door: running (``Pipeline`` in one process, ``DistributedRunner`` one rank per
stage, ``spawn_local`` and ``launch`` for local ranks, ``Job``), profiling (``profile_model``,
``profile_graph``; ``count_layers`` on the meta device), calibrating (``measure_link``, ``measure_runtime``) and the built-in
workloads (``build_model``). Sub-packages, in import order: ``runtime``, ``graphs``,
``distributed``, ``profiling``, ``workloads``.
"""

from executor.distributed.launch import launch
from executor.distributed.runner import DistributedRunner, StepResult
from executor.distributed.spawn import RankFailure, spawn_local
from executor.distributed.transport import PeerError
from executor.graphs.pipeline import Pipeline
from executor.profiling.calibrate import measure_link, measure_runtime
from executor.profiling.graph import profile_graph
from executor.profiling.meta import count_layers
from executor.profiling.profiler import profile_model
from executor.runtime.allocator import keep_freed_memory
from executor.runtime.job import Job, load_job
from executor.runtime.pipeline import manual_plan
from executor.workloads.models import build_model

__all__ = [
    "DistributedRunner",
    "Job",
    "PeerError",
    "Pipeline",
    "RankFailure",
    "StepResult",
    "build_model",
    "count_layers",
    "keep_freed_memory",
    "launch",
    "load_job",
    "manual_plan",
    "measure_link",
    "measure_runtime",
    "profile_graph",
    "profile_model",
    "spawn_local",
]
