"""Reading a project JSON file with errors that name the file and what went wrong.

    >>> read_json("missing.json", "plan")
    Traceback (most recent call last):
    ...
    FileNotFoundError: plan file 'missing.json' does not exist

Every reader of profiles, plans and traces comes through here, so a file that cannot be read,
is not UTF-8 or is not JSON (truncated, nested too deeply, ...) fails with one message that
names it, never with a traceback from deep inside the decoder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["decode_json", "is_file", "read_json"]


def decode_json(read: Callable[[], bytes], source: str, error: type[Exception]) -> Any:
    """The decoded content of what ``read()`` returns; anything wrong with it raises ``error``
    with a message that names ``source``."""
    try:
        raw = read()
    except OSError as exc:
        raise error(f"{source} cannot be read: {exc.strerror or exc}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{source} is not UTF-8 text ({exc.reason} at byte {exc.start}); give a "
                    f"JSON file") from None
    except json.JSONDecodeError as exc:
        raise error(f"{source} is not JSON: {exc}") from None
    except RecursionError:
        raise error(f"{source} nests JSON arrays or objects too deeply to read") from None


def is_file(path: str | Path) -> bool:
    """Whether ``path`` names an existing file (False for names no file system takes, such as
    one with a NUL byte: a loader then tries the name as a shipped one)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def read_json(path: str | Path, what: str, error: type[Exception] = ValueError) -> Any:
    """The decoded content of ``path``. A missing file raises FileNotFoundError (or ``error``
    when one other than ValueError is given); anything else wrong raises ``error``."""
    file = Path(path)
    source = f"{what} file {str(path)!r}"
    try:
        exists = file.exists()
    except (OSError, ValueError):  # e.g. an embedded NUL byte in the name
        exists = False
    if not exists:
        missing: type[Exception] = FileNotFoundError if error is ValueError else error
        raise missing(f"{source} does not exist")
    if file.is_dir():
        raise error(f"{source} is a directory; give the path of a JSON file")
    return decode_json(file.read_bytes, source, error)
