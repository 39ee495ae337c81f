"""Tests of partitioner/cost/."""
