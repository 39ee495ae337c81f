"""``partition-model profile``: measure a built-in or user model and write a profile.

    $ partition-model profile --model gpt-tiny --microbatch-sizes 1,2,4 --device cpu \\
          -o gpt-tiny.json
    $ partition-model profile --model mypkg.models:make --microbatch-sizes 8,16 --device cuda
    $ partition-model profile --model llama2-70b --microbatch-sizes 1,2,4 --device meta \\
          --target h200 -o llama2-70b.json      # no GPU, no memory: bytes exact, times modelled

``module:function`` names a function taking no arguments and returning an ``nn.Module`` or
``(nn.Module, sample_batch)``. An ``nn.Sequential`` is profiled child by child; any other
model is traced into a graph of layers (``partitioner.cli.profile_graph`` has its options).
The executor (torch) is imported only when this runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from partitioner.cli.options import count, count_list, size
from partitioner.cli.profile_graph import add_graph_arguments, graph_summary
from partitioner.formats.profile import save_profile
from partitioner.report.profiles import profile_summary

__all__ = ["main"]


def _flush(text: str) -> int:
    """``--flush``: a byte size, or 0/off."""
    return 0 if text.strip().lower() in ("0", "off") else size("--flush")(text)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model profile",
        description="Measure each layer of a model (forward/backward time, activation and "
                    "saved bytes) at several micro-batch sizes and write a gpipe-profile/1 "
                    "JSON file: the children of an nn.Sequential, or the layers of any other "
                    "model's traced graph.")
    p.add_argument("--model", metavar="NAME|module:function",
                   help="a built-in model (see --list-models) or a function returning an "
                        "nn.Module or (nn.Module, sample_batch)")
    p.add_argument("--list-models", action="store_true", help="list the built-in models")
    p.add_argument("--microbatch-sizes", type=count_list("--microbatch-sizes", high=2**20),
                   default=[1, 2, 4], metavar="1,2,4",
                   help="micro-batch sizes to measure (default: 1,2,4)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda[:N], or meta: no device at all (with --target; bytes "
                        "counted exactly, times from the target's device model) (default: cpu)")
    p.add_argument("--target", default=None, metavar="NAME|SPEC.json",
                   help="with --device meta: the device to profile for, a shipped device "
                        "model (h200, h100, a100, mi300x) or a gpipe-device/1 file")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16: cast parameters and floating inputs "
                        "(default: the model's own)")
    p.add_argument("--threads", type=count("--threads", high=1024), default=None,
                   help="torch intra-op threads while profiling (default: torch's)")
    p.add_argument("--clock", default="wall",
                   help="CPU clock: wall time (default) or thread, the thread's CPU time (needs "
                        "--threads 1; ignores other processes on a shared machine)")
    p.add_argument("--warmup", type=count("--warmup", 0, 10**4), default=3,
                   help="untimed runs first (default: 3)")
    p.add_argument("--repeat", type=count("--repeat", 1, 10**4), default=10,
                   help="timed runs; the median is kept (default: 10)")
    p.add_argument("--batch", type=count("--batch", high=2**20), default=None,
                   help="rows of a built-in model's sample (default: the largest size)")
    p.add_argument("--timing", default="auto",
                   help="model: time each layer inside passes of the whole model; layer: each "
                        "layer alone (for a model too big for the device); auto (default): "
                        "model where the whole model fits in half the free memory")
    p.add_argument("--flush", type=_flush, default=None, metavar="SIZE",
                   help="layers timed alone: flush the caches with a buffer of SIZE (e.g. 4MiB; "
                        "0: off) before each timed region (default: on the CPU, twice one "
                        "core's L2 cache when the model's weights do not fit in it)")
    p.add_argument("--keep-freed-memory", choices=("on", "off"), default="on",
                   help="on the CPU, keep freed memory for reuse as the pipeline runners do "
                        "(glibc malloc settings, process-wide; default on)")
    p.add_argument("--split-backward", choices=("on", "off"), default="on",
                   help="also measure each layer's split backward for zero-bubble schedules, "
                        "bwd_input_ms (I) and bwd_weight_ms (W), in as many further passes "
                        "(default on; off: bwd_ms only, a shorter run)")
    p.add_argument("--eval", action="store_true",
                   help="profile in eval mode (default: training mode)")
    p.add_argument("-o", "--output", metavar="PROFILE.json", help="write the profile here")
    add_graph_arguments(p)
    args = p.parse_args(argv)

    from tqdm import tqdm

    from executor.profiling.profiler import profile_model
    from executor.runtime.devices import resolve_device
    from executor.workloads.graphmodels import GRAPH_MODELS, build_graph_model
    from executor.workloads.loading import is_chain, load_any_model, resolve_leaves
    from executor.workloads.models import MODELS, build_model, list_models

    if args.list_models:
        width = max(len(name) for name, _ in list_models())
        for name, description in list_models():
            print(f"{name:<{width}}  {description}")
        return 0
    if not args.model:
        raise ValueError("give --model NAME|module:function (or --list-models)")
    if args.device == "meta" or args.target is not None:
        return _meta(args)
    resolve_device(args.device)  # missing CUDA is an error before the model is built
    model, sample, info = load_any_model(
        args.model, args.batch or max(args.microbatch_sizes), sample_spec=args.sample,
        seq_len=args.seq_len, input_shape=args.input_shape)
    chain = is_chain(model)
    loss = None
    if args.model in MODELS and args.sample is None:  # a built-in: its loss, on the last stage
        work = build_model(args.model, batch=max(args.microbatch_sizes))  # a row per sample
        loss = (work.loss_fn, work.target)
    elif args.model in GRAPH_MODELS and args.sample is None:  # a built-in graph model's too
        graph_work = build_graph_model(args.model, batch=max(args.microbatch_sizes))
        loss = (graph_work.loss_fn, graph_work.target)
    graph_opts = {} if chain else {"leaves": resolve_leaves(args.leaf),
                                   "max_layers": args.max_layers}
    sizes = len(args.microbatch_sizes)
    steps = sizes if not chain else len(list(model.children())) + (
        sizes if args.timing != "layer" else 0)
    with tqdm(total=steps, desc=f"profiling {args.model}", unit="step",
              file=sys.stderr, disable=None) as bar:
        prof = profile_model(
            model, sample, args.microbatch_sizes, args.device, dtype=args.dtype,
            warmup=args.warmup, repeat=args.repeat, threads=args.threads,
            clock=args.clock, timing=args.timing, flush_bytes=args.flush,
            train=not args.eval, keep_freed_memory=args.keep_freed_memory == "on",
            name=args.model, input_info=info, progress=lambda name: bar.update(1),
            split_backward=args.split_backward == "on", loss=loss, **graph_opts)
    print(profile_summary(prof))
    if not chain:
        print(graph_summary(prof))
    if args.output:
        save_profile(prof, args.output)
        print(f"wrote {args.output}")
    return 0


def _meta(args: argparse.Namespace) -> int:
    """``--device meta --target T``: a profile made without the device."""
    from executor.profiling.metaprofile import meta_profile
    from executor.workloads.loading import is_chain, load_any_model
    from executor.workloads.models import MODELS, build_model
    from partitioner.cli.main import CliError
    from partitioner.formats.device import load_device_model

    if args.target is None:
        raise CliError("--device meta profiles for a device one does not have: name it with "
                       "--target (h200, h100, a100, mi300x, or a gpipe-device/1 file)")
    if args.device != "meta":
        raise CliError(f"--target {args.target} profiles without the device: give --device "
                       f"meta with it (got --device {args.device}; on a real device, time it "
                       f"there without --target)")
    try:
        target = load_device_model(args.target)
    except (OSError, ValueError) as exc:
        raise CliError(f"--target: {exc}") from None
    batch = args.batch or max(args.microbatch_sizes)
    loss = None
    model: Any
    if args.model in MODELS:
        work = build_model(args.model, batch=batch, device="meta")
        model, sample, info = work.model, work.sample, dict(work.input_info)
        if args.sample is None:
            loss = (work.loss_fn, work.target)
    else:
        model, sample, info = load_any_model(args.model, batch, sample_spec=args.sample,
                                             seq_len=args.seq_len,
                                             input_shape=args.input_shape)
        if not is_chain(model):
            raise CliError(f"--device meta profiles nn.Sequential models; {args.model!r} is "
                           f"a {type(model).__name__} (profile it on a device, or pass a "
                           f"Sequential of its layers)")
    prof = meta_profile(model, sample, args.microbatch_sizes, target, args.model,
                        dtype=args.dtype or "bfloat16", loss=loss, input_info=info)
    print(profile_summary(prof))
    if args.output:
        save_profile(prof, args.output)
        print(f"wrote {args.output}")
    return 0
