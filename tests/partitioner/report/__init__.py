"""Tests of partitioner/report/."""
