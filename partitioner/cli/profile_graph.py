"""The options of ``partition-model profile`` for models that are not chains, and their report:

    $ partition-model profile --model tiny-llama --microbatch-sizes 1,2,4 -o llama.json
    $ partition-model profile --model transformers:AutoModel... --seq-len 64 --leaf 'layers.*'
    $ partition-model profile --model mypkg.models:UNet --input-shape 3,64,64 --max-layers 12

Any ``nn.Module`` but an ``nn.Sequential`` is traced into a graph of layers (torch.fx, else
torch.export) and each layer timed inside passes of the whole model. Its sample: ``--sample
module:function`` (called with the batch size), else for a Transformers model random
``input_ids`` (``--seq-len`` tokens) or ``pixel_values`` as its config says, else random
floats of ``--input-shape``. ``profile-graph`` is another name for ``profile``.
"""

from __future__ import annotations

import argparse

from partitioner.cli.options import count, shape
from partitioner.formats.profile import Profile

__all__ = ["add_graph_arguments", "graph_summary"]


def add_graph_arguments(p: argparse.ArgumentParser) -> None:
    """``--sample``, ``--seq-len``, ``--input-shape``, ``--leaf`` and ``--max-layers``."""
    g = p.add_argument_group("models that are not an nn.Sequential (traced into a graph)")
    g.add_argument("--sample", metavar="MODULE:FUNCTION", default=None,
                   help="a function of the batch size returning the model's sample (a tensor, "
                        "a tuple of tensors or a dict of keyword tensors)")
    g.add_argument("--seq-len", type=count("--seq-len", high=2**20), default=32,
                   help="tokens per sample of a Transformers text model's random input_ids "
                        "(default: 32)")
    g.add_argument("--input-shape", metavar="D1,D2,...", type=shape("--input-shape"),
                   default=None, help="one sample's shape without the batch dimension, for a "
                                      "model of random float inputs, e.g. 3,64,64")
    g.add_argument("--leaf", action="append", default=[], metavar="MODULE:CLASS|PATTERN",
                   help="a module class or module-name pattern (e.g. 'model.layers.*') whose "
                        "calls are layers of their own (repeatable; default: the model's "
                        "repeated blocks)")
    g.add_argument("--max-layers", type=count("--max-layers", high=2**20), default=None,
                   help="merge neighbouring layers until at most this many remain")


def graph_summary(prof: Profile) -> str:
    """One line: layers, edges, tied parameters and the fwd+bwd total at the largest size.

        >>> from partitioner import load_profile
        >>> graph_summary(load_profile("pipedream/resnet18")).split(":")[0]
        'pipedream-resnet18 traced into 70 layers'
    """
    total = sum(lay.fwd_ms[-1] + lay.bwd_ms[-1] for lay in prof.layers)
    trace = prof.extra.get("trace", {})
    how = f" with {trace['tracer']}" if isinstance(trace, dict) and "tracer" in trace else ""
    return (f"{prof.model} traced{how} into {prof.num_layers} layers: "
            f"{len(prof.edges or ())} edges, {len(prof.tied)} tied parameter(s), "
            f"{total:.2f} ms fwd+bwd at b={prof.microbatch_sizes[-1]}")
