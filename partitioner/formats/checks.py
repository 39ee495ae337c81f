"""Validating decoded JSON: every problem collected with its JSON path, nothing raised early.

    >>> p = Problems()
    >>> p.keys({"fwd_ms": [1.0], "edge": []}, "layers[0]", known={"fwd_ms", "edges"})
    >>> p.number(-1, "layers[0].fwd_ms[0]"), p.number(float("nan"), "x"), p.number("2", "y")
    (0.0, 0.0, 0.0)
    >>> print("\\n".join(p))
    layers[0]: unknown key 'edge' (did you mean 'edges'?); free-form data goes under 'extra'
    layers[0].fwd_ms[0]: -1 is negative
    x: nan is not finite
    y: '2' is not a number

The loaders of profiles, plans and traces use one ``Problems`` each, then raise one error
listing all of them: a user fixes a file in one go, not one message at a time.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Mapping
from typing import Any

from partitioner.formats.units import MAX_BYTES

__all__ = ["Problems", "is_number", "show"]


def is_number(x: object) -> bool:
    """A JSON number: an int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def show(x: object, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Problems(list[str]):
    """The problems found so far, each ``path: what is wrong``; the checks return a usable
    default after recording a problem, so validation goes on."""

    def add(self, path: str, message: str) -> None:
        self.append(f"{path}: {message}")

    def keys(self, obj: Mapping[str, Any], path: str, known: Collection[str],
             required: Collection[str] = ()) -> None:
        """Unknown keys (naming the nearest known one) and missing required keys."""
        for key in obj:
            if key in known:
                continue
            near = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]!r}?)" if near else (
                f" (known: {', '.join(sorted(known))})")
            self.add(path, f"unknown key {show(key)}{hint}; free-form data goes under 'extra'")
        for key in required:
            if key not in obj:
                self.add(path, f"missing required field {key!r}")

    def mapping(self, x: object, path: str, what: str) -> dict[str, Any]:
        """``x`` if it is a JSON object, else {} (and a problem)."""
        if isinstance(x, dict):
            return x
        self.add(path, f"expected an object ({what}), got {show(x)}")
        return {}

    def text(self, x: object, path: str, default: str = "") -> str:
        if isinstance(x, str):
            return x
        self.add(path, f"{show(x)} is not a string")
        return default

    def number(self, x: object, path: str, *, low: float = 0.0, high: float = MAX_BYTES,
               integer: bool = False, inf_ok: bool = False, default: float = 0.0) -> float:
        """``x`` as a float within [low, high] (``"inf"`` or inf too when ``inf_ok``)."""
        if inf_ok and (x == "inf" or (is_number(x) and x == math.inf)):
            return math.inf
        if not is_number(x):
            self.add(path, f"{show(x)} is not a number")
            return default
        v = float(x)  # type: ignore[arg-type]
        if not math.isfinite(v):
            self.add(path, f"{show(x)} is not finite")
            return default
        if v < low:
            self.add(path, f"{show(x)} is negative" if low == 0 and v < 0 else
                     f"{show(x)} is below {low:g}")
            return default
        if v > high:
            self.add(path, f"{show(x)} is over {high:g}; check the unit")
            return default
        if integer and v != int(v):
            self.add(path, f"{show(x)} is not a whole number")
            return default
        return v + 0.0  # -0.0 is 0.0

    def whole(self, x: object, path: str, *, low: int = 0, high: float = MAX_BYTES,
              default: int | None = None) -> int:
        """``x`` as a JSON integer (not a float such as 2.0) within [low, high] (else
        ``default``, or ``low``)."""
        fallback = low if default is None else default
        if not (isinstance(x, int) and not isinstance(x, bool)):
            self.add(path, f"{show(x)} is not a whole number")
            return fallback
        if not low <= x <= high:
            top = f"{int(high)}" if float(high).is_integer() else f"{high:g}"
            self.add(path, f"{x} is outside {low}..{top}")
            return fallback
        return x
