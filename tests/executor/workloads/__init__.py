"""Tests of executor/workloads/."""
