"""``partition-model profile``: measure a built-in or user model and write a profile.

    $ partition-model profile --model gpt-tiny --microbatch-sizes 1,2,4 --device cpu \\
          -o gpt-tiny.json
    $ partition-model profile --model mypkg.models:make --microbatch-sizes 8,16 --device cuda

``module:function`` names a function taking no arguments and returning
``(nn.Sequential, sample_batch)``. User errors raise ValueError, which the command turns
into one message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from tqdm import tqdm

from partitioner.profile import Profile, save_profile
from partitioner.report import format_table
from partitioner.units import format_bytes, parse_bytes

from .measure import CLOCKS, Batch
from .models import MODELS, build_model, list_models
from .profiler import DTYPES, TIMINGS, parse_device, profile_model

__all__ = ["load_model_spec", "main"]


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"micro-batch sizes {text!r} must be whole numbers >= 1 separated by commas, "
            f"e.g. 1,2,4,8")
    return sizes


def _count(name: str, low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} {text!r} must be a whole number >= {low}")
        return value
    return parse


def load_model_spec(spec: str, batch: int) -> tuple[nn.Sequential, Batch, dict[str, Any]]:
    """A built-in name (built with ``batch`` sample rows) or ``module:function``; returns the
    model, its sample batch and a description of the input for the profile."""
    if spec in MODELS:
        work = build_model(spec, batch=batch)
        return work.model, work.sample, dict(work.input_info)
    if ":" not in spec:
        raise ValueError(f"--model {spec!r} is neither a built-in model ({', '.join(MODELS)}) "
                         f"nor module:function; see --list-models")
    module_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {spec!r}: cannot import module {module_name!r} ({exc}); "
                         f"check the name and that it is on PYTHONPATH") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"--model {spec!r}: module {module_name!r} has no function "
                         f"{func_name!r}")
    result = func()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError(f"--model {spec!r}: {func_name}() returned {type(result).__name__}; it "
                         f"must return (nn.Sequential, sample_batch)")
    model, sample = result
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"--model {spec!r}: {func_name}() returned a {type(model).__name__} as "
                         f"the model; the profiler needs an nn.Sequential of the pipeline's "
                         f"layers")
    if not (isinstance(sample, Tensor) or (isinstance(sample, tuple) and sample
                                           and all(isinstance(t, Tensor) for t in sample))):
        raise ValueError(f"--model {spec!r}: the sample batch is a {type(sample).__name__}; "
                         f"give a tensor or a tuple of tensors whose first dimension is the "
                         f"batch")
    return model, sample, {"source": spec}


def _summary(prof: Profile) -> str:
    j = len(prof.microbatch_sizes) - 1
    rows = [[lay.name, lay.type, f"{lay.fwd_ms[j]:.3f}", f"{lay.bwd_ms[j]:.3f}",
             format_bytes(lay.param_bytes), format_bytes(lay.out_bytes[j]),
             format_bytes(lay.saved_bytes[j])] for lay in prof.layers]
    timing = prof.extra.get("harness", {}).get("timing")
    where = {"model": ", layers timed inside the whole model",
             "layer": ", layers timed alone"}.get(str(timing), "")
    head = (f"{prof.model} on {prof.device.name} ({prof.dtype}){where}, "
            f"micro-batch size {prof.microbatch_sizes[j]}:")
    return head + "\n" + format_table(
        ["layer", "type", "fwd_ms", "bwd_ms", "params", "out", "saved"], rows)


def _flush_arg(text: str) -> int:
    if text.strip().lower() in ("0", "off"):
        return 0
    try:
        return int(parse_bytes(text))
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(f"--flush {text!r}: {exc}") from None


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model profile",
        description="Measure each layer of an nn.Sequential (forward/backward time, "
                    "activation and saved bytes) at several micro-batch sizes and write a "
                    "gpipe-profile/1 JSON file.")
    p.add_argument("--model", metavar="NAME|module:function",
                   help="a built-in model (see --list-models) or a function returning "
                        "(nn.Sequential, sample_batch)")
    p.add_argument("--list-models", action="store_true", help="list the built-in models")
    p.add_argument("--microbatch-sizes", type=_sizes, default=[1, 2, 4], metavar="1,2,4",
                   help="micro-batch sizes to measure (default: 1,2,4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast parameters and floating inputs (default: the model's own)")
    p.add_argument("--threads", type=_count("--threads", 1), default=None,
                   help="torch intra-op threads while profiling (default: torch's)")
    p.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="CPU clock: wall time (default) or the thread's CPU time (needs "
                        "--threads 1; ignores other processes on a shared machine)")
    p.add_argument("--warmup", type=_count("--warmup", 0), default=3,
                   help="untimed runs first (default: 3)")
    p.add_argument("--repeat", type=_count("--repeat", 1), default=10,
                   help="timed runs; the median is kept (default: 10)")
    p.add_argument("--batch", type=_count("--batch", 1), default=None,
                   help="rows of a built-in model's sample (default: the largest size)")
    p.add_argument("--timing", choices=TIMINGS, default="auto",
                   help="model: time each layer inside passes of the whole model; layer: each "
                        "layer alone (for a model too big for the device); auto (default): "
                        "model where the whole model fits in half the free memory")
    p.add_argument("--flush", type=_flush_arg, default=None, metavar="SIZE",
                   help="layers timed alone: flush the caches with a buffer of SIZE (e.g. 4MiB; "
                        "0: off) before each timed region (default: on the CPU, twice one "
                        "core's L2 cache when the model's weights do not fit in it)")
    p.add_argument("--eval", action="store_true",
                   help="profile in eval mode (default: training mode)")
    p.add_argument("-o", "--output", metavar="PROFILE.json", help="write the profile here")
    args = p.parse_args(argv)

    if args.list_models:
        width = max(len(name) for name, _ in list_models())
        for name, description in list_models():
            print(f"{name:<{width}}  {description}")
        return 0
    if not args.model:
        raise ValueError("give --model NAME|module:function (or --list-models)")
    parse_device(args.device)  # missing CUDA is an error before the model is built
    model, sample, info = load_model_spec(args.model, args.batch or max(args.microbatch_sizes))
    steps = len(model) + (len(args.microbatch_sizes) if args.timing != "layer" else 0)
    with tqdm(total=steps, desc=f"profiling {args.model}", unit="step",
              file=sys.stderr, disable=None) as bar:
        try:
            prof = profile_model(
                model, sample, args.microbatch_sizes, args.device, dtype=args.dtype,
                warmup=args.warmup, repeat=args.repeat, threads=args.threads,
                clock=args.clock, timing=args.timing, flush_bytes=args.flush,
                train=not args.eval,
                name=args.model, input_info=info,
                progress=lambda name: bar.update(1))
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    print(_summary(prof))
    if args.output:
        save_profile(prof, args.output)
        print(f"wrote {args.output}")
    return 0
