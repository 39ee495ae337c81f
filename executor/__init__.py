"""The torch side of gpipe-planner: run a plan as micro-batched pipeline training (DESIGN.md).

    >>> import torch
    >>> from executor import Pipeline, manual_plan
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> pipe = Pipeline(model, manual_plan([0, 1, 3], microbatches=2, global_batch=4))
    >>> float(pipe.train_step(torch.ones(4, 4), torch.zeros(4, 1), torch.nn.MSELoss())) >= 0
    True
"""

from .pipeline import Pipeline, manual_plan

__all__ = ["Pipeline", "manual_plan"]
