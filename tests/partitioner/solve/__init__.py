"""Tests of partitioner/solve/."""
