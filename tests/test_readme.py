"""Every Python snippet in README runs as written, and every command it names exists."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from partitioner.cli.main import COMMANDS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_as_written(index: int, tmp_path: Path) -> None:
    cwd = Path.cwd()
    os.chdir(tmp_path)  # snippets may write files (plan.json, ...)
    try:
        exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {})
    finally:
        os.chdir(cwd)


def test_subcommands_named_in_readme_exist() -> None:
    named = set(re.findall(r"partition-model ([a-z][a-z-]+)", README))
    words = {"--profile", "run", "search"}  # the first argument after partition-model
    assert named & words
    assert named - {"calibrate", "compare", "export-schedule", "profile", "profile-graph", "run",
                    "search",
                    "simulate", "plan"} <= {"command"}, named
    assert set(COMMANDS) >= named - {"command"}
