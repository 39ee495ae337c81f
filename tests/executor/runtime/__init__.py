"""Tests of executor/runtime/."""
