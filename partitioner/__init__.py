"""Pure planning for GPipe pipelines (no torch): profiles, cost model, exact partition, plans.

    >>> from partitioner import CostModel, load_profile, make_plan
    >>> cm = CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=4, recompute="always")
    >>> make_plan(cm, memory_limit_bytes=80 * 2**30).layer_ranges()
    [(0, 7), (7, 14), (14, 20), (20, 26)]

The front door: loading and saving profiles, plans and traces; planning (``make_plan``,
``partition_chain``); searching; simulating; comparing a prediction with a run. The
sub-packages hold the rest, in the order they import each other: ``schedule`` (the IR),
``formats``, ``cost``, ``simulator``, ``solve``, ``report``, ``cli``.
"""

from partitioner.cost.messages import Message, stage_messages
from partitioner.cost.model import CostModel, bytes_per_param, split_microbatches
from partitioner.cost.partition import Solution, evaluate_assignment
from partitioner.formats.assumptions import LINKS, Link, Runtime
from partitioner.formats.plan import Plan, PlanError, Prediction, StagePlan, load_plan, save_plan
from partitioner.formats.profile import (
    LayerProfile,
    Profile,
    ProfileError,
    load_profile,
    save_profile,
    shipped_profiles,
)
from partitioner.formats.timeline import Timeline, TraceError, load_chrome_trace, save_chrome_trace
from partitioner.report.compare import Comparison, compare_timelines
from partitioner.schedule.generators import make_schedule
from partitioner.schedule.ir import Action, Schedule, ScheduleError, validate
from partitioner.simulator.engine import SimResult, simulate
from partitioner.simulator.plans import find_profile, simulate_plan
from partitioner.solve.chain import partition_chain
from partitioner.solve.infeasible import InfeasibleError
from partitioner.solve.planner import make_plan, partition, plan_from_solution
from partitioner.solve.search import SearchResult, search

__all__ = [
    "LINKS",
    "Action",
    "Comparison",
    "CostModel",
    "InfeasibleError",
    "LayerProfile",
    "Link",
    "Message",
    "Plan",
    "PlanError",
    "Prediction",
    "Profile",
    "ProfileError",
    "Runtime",
    "Schedule",
    "ScheduleError",
    "SearchResult",
    "SimResult",
    "Solution",
    "StagePlan",
    "Timeline",
    "TraceError",
    "bytes_per_param",
    "compare_timelines",
    "evaluate_assignment",
    "find_profile",
    "load_chrome_trace",
    "load_plan",
    "load_profile",
    "make_plan",
    "make_schedule",
    "partition",
    "partition_chain",
    "plan_from_solution",
    "save_chrome_trace",
    "save_plan",
    "save_profile",
    "search",
    "shipped_profiles",
    "simulate",
    "simulate_plan",
    "split_microbatches",
    "stage_messages",
    "validate",
]
