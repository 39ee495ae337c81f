"""The sections of ``tools/gpu_check.py``: one module each, and the budget and report they share.

    >>> from gpucheck.record import Budget
    >>> Budget(60.0).allows(5.0)
    True

``record`` (budget clock, report, GPU timing), ``settings`` (the shapes of a GPU run and of a
dry run), then one module per section in the order the check runs them: ``transparency`` (a),
``profiler`` (b), ``overhead`` (c), ``steps`` (d).
"""
