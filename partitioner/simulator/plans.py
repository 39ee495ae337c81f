"""Simulate a plan file: find the profile it was made from, apply what-if overrides, replay it.

    >>> from partitioner import CostModel, load_profile, make_plan
    >>> plan = make_plan(CostModel(load_profile("h200/gpt2-medium"), 16, 4, stages=2))
    >>> res, cm, devices = simulate_plan(plan, find_profile(plan), num_devices=1)
    >>> devices, res.bubble_fraction        # both stages on one device: no bubble
    ([0, 0], 0.0)
"""

from __future__ import annotations

from dataclasses import replace

from partitioner.cost.model import CostModel
from partitioner.formats.plan import Plan, PlanError
from partitioner.formats.plan_replicas import default_layout
from partitioner.formats.plan_schedule import SYNTH
from partitioner.formats.profile import Profile, load_profile, shipped_profiles
from partitioner.schedule.generators import make_schedule, placed_like
from partitioner.simulator.engine import SimResult, device_indices, simulate

__all__ = ["find_profile", "simulate_plan"]


def find_profile(plan: Plan, path_or_name: str | None = None) -> Profile:
    """The profile a plan was made from: ``path_or_name`` if given (checked against the plan's
    sha256), else the shipped profile of the plan's model whose sha256 matches."""
    if path_or_name is not None:
        profile = load_profile(path_or_name)
        plan.check_against(plan.num_layers, profile)
        return profile
    names = shipped_profiles()
    named = [n for n in names if n.rsplit("/", 1)[-1] == plan.profile_model]
    for name in named + [n for n in names if n not in named]:
        profile = load_profile(name)
        if profile.model == plan.profile_model and profile.sha256() == plan.profile_sha256:
            return profile
    raise PlanError(f"the plan was made from profile {plan.profile_model!r} (sha256 "
                    f"{plan.profile_sha256[:12]}…), which is not among the shipped profiles; "
                    f"give it with --profile PATH")


def _replicated(cm: CostModel, plan: Plan, rank_of: tuple[int, ...], own_link: bool
                ) -> CostModel:
    """The links of a replicated plan: its topology's, for its layout (the layout holds for
    the plan's D; other replicas run in the default layout), or the plan's one link for
    everything without a topology; a link given as an override stays between stages."""
    if plan.topology is None:
        return replace(cm, allreduce_link=cm.link)
    ranks = max(rank_of) + 1
    layout = (plan.rank_layout if cm.replicas == plan.replicas and ranks == plan.pipeline_ranks
              else default_layout(ranks, cm.replicas))
    p2p, allreduce = plan.topology.layout_links(layout, rank_of)
    return replace(cm, link=cm.link if own_link else p2p, allreduce_link=allreduce)


def simulate_plan(plan: Plan, profile: Profile, *, num_devices: int | None = None,
                  **overrides: object) -> tuple[SimResult, CostModel, list[int]]:
    """Simulate a plan, optionally with other ``global_batch``, ``microbatches``, ``schedule``,
    ``recompute``, ``link``, ``optimizer``, ``replicas``, ``shard_optimizer``, ``allreduce``
    (CostModel fields) and ``optimizer_ms``; with
    ``num_devices`` = N below the plan's R ranks, ranks go onto N devices in contiguous blocks.
    The plan's own schedule (``Plan.build_schedule``: its V stages per rank, or the actions it
    lists) runs unless the overrides change the schedule or M."""
    big_k = plan.num_stages
    optimizer_ms = float(overrides.pop("optimizer_ms", 0.0))  # type: ignore[arg-type]
    fields: dict[str, object] = {
        "global_batch": plan.global_batch, "microbatches": plan.microbatches,
        "schedule": plan.schedule, "recompute": plan.recompute, "link": plan.link,
        "optimizer": plan.optimizer, "runtime": plan.runtime, "replicas": plan.replicas,
        "shard_optimizer": plan.shard_optimizer,
        "allreduce": plan.topology.allreduce if plan.topology else "overlapped"}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    own = ((fields["schedule"], fields["microbatches"]) == (plan.schedule, plan.microbatches)
           and fields.get("stages_per_rank", plan.stages_per_rank) == plan.stages_per_rank)
    if own:
        fields["stages_per_rank"] = plan.stages_per_rank
        if plan.schedule == SYNTH:  # its cost model: the fixed schedule placed as it is
            fields["schedule"] = placed_like(plan.build_schedule())
    elif fields["schedule"] == SYNTH:
        raise ValueError("a synthesised schedule is made for its plan's M and stages; to "
                         "synthesise another, plan again with --schedule synth")
    cm = CostModel(profile, stages=big_k, **fields)  # type: ignore[arg-type]
    schedule = plan.build_schedule() if own else make_schedule(
        cm.schedule, big_k, cm.microbatches, cm.stages_per_rank)
    if cm.replicas > 1:
        cm = _replicated(cm, plan, schedule.rank_of, "link" in overrides and
                         overrides["link"] != plan.link)
    rank_of, ranks = schedule.rank_of, schedule.ranks
    if num_devices is None:
        devices = device_indices([s.device for s in plan.stages], rank_of)
    elif 1 <= num_devices <= ranks:
        devices = [rank_of[k] * num_devices // ranks for k in range(big_k)]
    else:
        raise ValueError(f"--devices {num_devices}: the plan has K={big_k} stages on R={ranks} "
                         f"ranks, so it runs on 1..{ranks} devices; for more devices plan "
                         f"again with --stages "
                         f"{num_devices}, or let `partition-model search --devices "
                         f"{num_devices}` choose K")
    res = simulate(cm, nodes=plan.stage_nodes(), schedule=schedule, devices=devices,
                   optimizer_ms=optimizer_ms)
    return res, cm, devices
