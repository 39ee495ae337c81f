"""Pure planning for GPipe pipelines (no torch): profiles, cost model, exact partition, plans.

    >>> from partitioner import CostModel, load_profile, make_plan
    >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=4, recompute="always")
    >>> [s.layers for s in make_plan(cm, memory_limit_bytes=80 * 2**30).stages]
    [(0, 7), (7, 14), (14, 20), (20, 26)]
"""

from .chain import ChainSolution, InfeasibleError, partition_chain, stage_costs
from .costs import LINKS, CostModel, Link, bytes_per_param, split_microbatches
from .plan import Plan, PlanError, Prediction, StagePlan, load_plan, save_plan
from .planner import make_plan
from .profile import LayerProfile, Profile, ProfileError, load_profile, save_profile
from .search import SearchResult, search
from .simulate import SimResult, simulate

__all__ = [
    "LINKS",
    "ChainSolution",
    "CostModel",
    "InfeasibleError",
    "LayerProfile",
    "Link",
    "Plan",
    "PlanError",
    "Prediction",
    "Profile",
    "ProfileError",
    "SearchResult",
    "SimResult",
    "StagePlan",
    "bytes_per_param",
    "load_plan",
    "load_profile",
    "make_plan",
    "partition_chain",
    "save_plan",
    "save_profile",
    "search",
    "simulate",
    "split_microbatches",
    "stage_costs",
]
