"""``partition-model profile-graph``: trace a model with torch.fx and write a graph profile.

    $ partition-model profile-graph --model mypkg.models:UNet --input-shape 3,64,64 \\
          --microbatch-sizes 1,2,4 [--leaf mypkg.models:Block] -o unet.json

The executor (torch) is imported only when this runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from partitioner.cli.main import CliError
from partitioner.cli.options import count, count_list, shape
from partitioner.formats.profile import save_profile
from partitioner.formats.specs import load_spec

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="partition-model profile-graph",
                                description="Trace a model with torch.fx and write a "
                                            "gpipe-profile/1 graph profile (with edges).")
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="a callable returning the nn.Module, e.g. mypkg.models:UNet")
    p.add_argument("--input-shape", required=True, metavar="D1,D2,...",
                   type=shape("--input-shape"),
                   help="shape of one sample, without the batch dimension, e.g. 3,64,64")
    p.add_argument("--microbatch-sizes", type=count_list("--microbatch-sizes", high=2**16),
                   default=[1, 2, 4], metavar="1,2,4", help="micro-batch sizes to measure")
    p.add_argument("--leaf", action="append", default=[], metavar="MODULE:CLASS",
                   help="a module class to keep as one layer per call (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--repeat", type=count("--repeat", 1, 10**4), default=5,
                   help="timed runs per node; the median is kept (default: 5)")
    p.add_argument("-o", "--output", required=True, metavar="PROFILE.json")
    args = p.parse_args(argv)

    import torch

    from executor.profiling.graph import profile_graph
    from executor.runtime.devices import resolve_device

    device = resolve_device(args.device)
    factory = load_spec(args.model, "--model")
    leaves = [load_spec(s, "--leaf") for s in args.leaf]
    bad = [s for s, c in zip(args.leaf, leaves, strict=True)
           if not (isinstance(c, type) and issubclass(c, torch.nn.Module))]
    if bad:
        raise CliError(f"--leaf {bad[0]!r} is not an nn.Module class")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"--model {args.model!r} returned a {type(model).__name__}, not an "
                       f"nn.Module")
    sample = torch.randn(max(args.microbatch_sizes), *args.input_shape, device=device)
    prof = profile_graph(model.to(device), sample, args.microbatch_sizes, repeats=args.repeat,
                         leaf_modules=leaves, name=args.model)
    save_profile(prof, args.output)
    total = sum(lay.fwd_ms[-1] + lay.bwd_ms[-1] for lay in prof.layers)
    print(f"wrote {args.output}: {prof.num_layers} layers, {len(prof.edges or ())} edges, "
          f"{total:.2f} ms fwd+bwd at b={prof.microbatch_sizes[-1]}")
    return 0
