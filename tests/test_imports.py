"""partitioner/ is pure planning: importing every module of it must not import torch."""

import pkgutil
import subprocess
import sys

import partitioner


def test_partitioner_imports_no_torch() -> None:
    modules = [m.name for m in pkgutil.iter_modules(partitioner.__path__, "partitioner.")]
    assert "partitioner.chain" in modules  # the listing works, so the check means something
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'executor')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"partitioner imported {result.stdout} {result.stderr}"
