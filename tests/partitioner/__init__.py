"""Tests of partitioner/, one folder per sub-package."""
