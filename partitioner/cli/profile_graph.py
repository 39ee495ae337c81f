"""``partition-model profile-graph``: trace a model with torch.fx and write a graph profile.

    $ partition-model profile-graph --model mypkg.models:UNet --input-shape 3,64,64 \\
          --microbatch-sizes 1,2,4 [--leaf mypkg.models:Block] -o unet.json

The executor (torch) is imported only when this runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from partitioner.cli.options import count, count_list, shape
from partitioner.formats.profile import save_profile

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

    from executor.profiling.graph import profile_graph_of

    prof = profile_graph_of(args.model, args.input_shape, args.microbatch_sizes,
                            leaf_modules=args.leaf, device=args.device, repeats=args.repeat)
    save_profile(prof, args.output)
    total = sum(lay.fwd_ms[-1] + lay.bwd_ms[-1] for lay in prof.layers)
    print(f"wrote {args.output}: {prof.num_layers} layers, {len(prof.edges or ())} edges, "
          f"{total:.2f} ms fwd+bwd at b={prof.microbatch_sizes[-1]}")
    return 0
