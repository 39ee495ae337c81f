"""What the check runs: the shapes, repeats and tolerances of a GPU run and of a CPU dry run.

    >>> GPU.profile_models[0], DRY_RUN.device
    (('gpt2-medium', (1, 2, 4, 8, 16)), 'cpu')

One set of code paths, two sizes: the dry run swaps the built-in GPU-sized models for tiny
ones (``gpt-tiny``, ``resnet-tiny``) and takes few repeats, so that the whole check runs on a
2-core CPU in well under a minute and cannot rot between GPU windows. The estimates are the
seconds each piece of work is allowed to take before the budget clock skips it (generous on
the GPU: a skipped figure costs less than a run killed from outside).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DRY_RUN", "GPU", "SECTIONS", "Settings"]

#: The sections in the order they run (their value: correctness, then the profile, then speed).
SECTIONS = ("transparency", "profiler", "overhead", "steps")


@dataclass(frozen=True)
class Settings:
    """One run's shapes. Times are seconds; B is a global batch, M micro-batches, K stages."""

    mode: str  # "gpu" or "dry-run"
    device: str
    dtype: str  # of the profiler, overhead and steps sections; transparency runs both
    warmup: int
    repeat: int
    # (a) transparency: every schedule, K = 1..4 on one device, uneven micro-batches (B, M)
    transparency_model: str
    transparency_batch: int
    transparency_microbatches: int
    every_recompute: bool  # all three recompute modes per case, else one per case in turn
    fp32_rtol: float
    bf16_rtol: float
    # (b) profiler: (built-in model, micro-batch sizes)
    profile_models: tuple[tuple[str, tuple[int, ...]], ...]
    # (c) overhead: the runner against a plain loop, K stages on one device
    overhead_model: str
    overhead_batch: int
    overhead_microbatches: tuple[int, ...]
    overhead_stages: tuple[int, ...]
    overhead_rounds: int
    overhead_goal: float  # the runner's step at most this fraction over the loop's
    # (d) whole GPipe steps on one device: the model cut into equal segments
    steps_model: str
    steps_batch: int
    steps_microbatches: tuple[int, ...]
    segments: int
    steps_warmup: int
    steps_repeat: int
    # estimates: (section or piece of work) -> seconds
    estimates: tuple[tuple[str, float], ...]

    def estimate(self, key: str) -> float:
        return dict(self.estimates)[key]


_TOLERANCES = {"fp32_rtol": 1e-5, "bf16_rtol": 5e-2}

GPU = Settings(
    mode="gpu", device="cuda:0", dtype="bfloat16", warmup=3, repeat=10,
    transparency_model="gpt-tiny", transparency_batch=7, transparency_microbatches=3,
    every_recompute=True, **_TOLERANCES,
    profile_models=(("gpt2-medium", (1, 2, 4, 8, 16)), ("resnet50", (8, 16, 32))),
    overhead_model="gpt2-medium", overhead_batch=16, overhead_microbatches=(1, 4, 16),
    overhead_stages=(1, 4), overhead_rounds=10, overhead_goal=0.05,
    steps_model="gpt2-medium", steps_batch=16, steps_microbatches=(1, 2, 4, 8, 16), segments=4,
    steps_warmup=2, steps_repeat=5,
    estimates=(("transparency", 20.0), ("transparency case", 2.0),
               ("profile model", 60.0), ("profile whole", 20.0), ("profile alone", 60.0),
               ("overhead", 30.0), ("overhead cell", 15.0),
               ("steps", 30.0), ("steps config", 12.0)),
)

DRY_RUN = Settings(
    mode="dry-run", device="cpu", dtype="float32", warmup=1, repeat=2,
    transparency_model="gpt-tiny", transparency_batch=7, transparency_microbatches=3,
    every_recompute=False, **_TOLERANCES,
    profile_models=(("gpt-tiny", (1, 2, 4, 8)), ("resnet-tiny", (1, 2))),
    overhead_model="gpt-tiny", overhead_batch=8, overhead_microbatches=(1, 4, 8),
    overhead_stages=(1, 4), overhead_rounds=3, overhead_goal=0.05,
    steps_model="gpt-tiny", steps_batch=8, steps_microbatches=(1, 2, 4, 8), segments=4,
    steps_warmup=1, steps_repeat=2,
    estimates=(("transparency", 5.0), ("transparency case", 0.5),
               ("profile model", 3.0), ("profile whole", 1.0), ("profile alone", 3.0),
               ("overhead", 2.0), ("overhead cell", 0.5),
               ("steps", 2.0), ("steps config", 0.5)),
)
