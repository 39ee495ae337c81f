"""Reading a project JSON file with errors that name the file and what went wrong.

    >>> read_json("missing.json", "plan")
    Traceback (most recent call last):
    ...
    FileNotFoundError: plan file 'missing.json' does not exist
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_json"]


def read_json(path: str | Path, what: str, error: type[Exception] = ValueError) -> Any:
    """The decoded content of ``path``. Broken JSON raises ``error``; a missing file raises
    FileNotFoundError, or ``error`` when one other than ValueError is given."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        missing: type[Exception] = FileNotFoundError if error is ValueError else error
        raise missing(f"{what} file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} file {str(path)!r} is not JSON: {exc}") from None
