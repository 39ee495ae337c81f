"""Tests of partitioner/cli/."""
