"""Tests of partitioner/simulator/."""
