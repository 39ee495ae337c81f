"""Tests of executor/distributed/."""
