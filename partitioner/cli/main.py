"""The ``partition-model`` command: one table of subcommands and one error handler.

    $ partition-model --profile h200/gpt2-medium --stages 4 --microbatches 4 \\
          --global-batch 16 --recompute always -o plan.json
    $ partition-model search --profile h200/gpt2-medium --devices 8 --global-batch 16

The first argument names a subcommand; without one, the command plans. Each subcommand's
module is imported only when it runs, and those that need torch (profile, profile-graph,
calibrate, run) import the executor inside, so ``partitioner`` itself never imports torch.
Every user error, a failed rank included, exits with status 2 and one message that names the
value and the fix; never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

__all__ = ["COMMANDS", "EXIT_USAGE", "CliError", "main", "user_errors"]

#: Subcommands: name -> (module of the partitioner.cli package, what it does). Each module
#: has ``main(argv) -> exit status``.
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("plan", "partition a profiled model into K stages and write a plan (default)"),
    "search": ("search", "try K, M, recompute and schedule; write the fastest plan"),
    "simulate": ("simulate", "replay a plan's schedule, with what-if overrides"),
    "compare": ("compare", "a predicted timeline against a measured one"),
    "profile": ("profile", "measure each layer of a model (a chain or a traced graph) and "
                           "write a profile"),
    "profile-graph": ("profile", "another name for profile"),
    "calibrate": ("calibrate", "measure this machine's link and the executor's runtime"),
    "export-schedule": ("export", "write a plan's schedule for another runtime (torch's "
                                  "pipelining CSV)"),
    "run": ("run", "train a plan with one rank per stage (local CPU ranks or torchrun)"),
}

EXIT_USAGE = 2


class CliError(Exception):
    """A user error already phrased for the terminal."""


def user_errors() -> tuple[type[BaseException], ...]:
    """What a command may raise for bad input or a failed run: the project's errors are all
    ValueErrors (profile, plan, trace, infeasible, ...), plus files that cannot be opened,
    wrong types, and, once the executor is loaded, a failed rank or peer."""
    errors: list[type[BaseException]] = [CliError, ValueError, TypeError, OSError]
    for module, name in (("executor.distributed.spawn", "RankFailure"),
                         ("executor.distributed.transport", "PeerError")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            errors.append(getattr(loaded, name))
    return tuple(errors)


def describe() -> str:
    """The subcommands, one line each, for ``--help``."""
    width = max(map(len, COMMANDS))
    return "subcommands:\n" + "\n".join(f"  {name:<{width}}  {text}"
                                        for name, (_, text) in COMMANDS.items())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in COMMANDS else "plan"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    module = importlib.import_module(f"partitioner.cli.{COMMANDS[name][0]}")
    command: Callable[[Sequence[str]], int] = module.main
    try:
        return command(rest)
    except user_errors() as exc:
        prog = "partition-model" if name == "plan" else f"partition-model {name}"
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
