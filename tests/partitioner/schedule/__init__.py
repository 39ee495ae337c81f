"""Tests of partitioner/schedule/."""
