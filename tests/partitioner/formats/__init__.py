"""Tests of partitioner/formats/."""
