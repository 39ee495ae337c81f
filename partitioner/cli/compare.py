"""``partition-model compare PREDICTED MEASURED``: a prediction against a run of the same plan.

    $ partition-model compare predicted.json measured.json
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from partitioner.formats.timeline import load_chrome_trace
from partitioner.report.compare import compare_timelines

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="partition-model compare",
        description="Compare a predicted timeline with a measured one of the same plan "
                    "(Chrome traces written by 'partition-model simulate --trace' and by "
                    "'partition-model run --trace').")
    p.add_argument("predicted", help="predicted trace (JSON)")
    p.add_argument("measured", help="measured trace (JSON)")
    args = p.parse_args(argv)
    comparison = compare_timelines(load_chrome_trace(args.predicted),
                                   load_chrome_trace(args.measured))
    print(comparison.report())
    return 0
