"""Naming user code as ``module:function``, and loading it, with errors that say what to fix.

    >>> load_spec("math:sqrt", "--model")(4.0)
    2.0
    >>> load_spec("math", "--job")
    Traceback (most recent call last):
    ...
    ValueError: --job 'math' is not of the form module:function (e.g. mypkg.train:job)

One loader for every option that takes user code (``--model``, ``--job``, ``--leaf``): the
module must be importable (on PYTHONPATH, or the current directory) and define the name.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

__all__ = ["is_spec", "load_spec"]

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_spec(text: str) -> bool:
    """Whether ``text`` has the form ``module:function`` (dotted names on both sides)."""
    return bool(_SPEC.match(text))


def load_spec(spec: str, option: str) -> Any:
    """The object ``spec`` names (``module:name``, ``name`` may be dotted); ValueError naming
    ``option`` when it cannot be loaded."""
    if not is_spec(spec):
        raise ValueError(f"{option} {spec!r} is not of the form module:function "
                         f"(e.g. mypkg.train:job)")
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{option} {spec!r}: cannot import module {module_name!r} ({exc}); "
                         f"check the name and that it is on PYTHONPATH") from None
    except Exception as exc:  # the user's module itself failed while importing
        raise ValueError(f"{option} {spec!r}: importing module {module_name!r} failed: "
                         f"{type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{option} {spec!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj
