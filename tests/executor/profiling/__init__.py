"""Tests of executor/profiling/."""
