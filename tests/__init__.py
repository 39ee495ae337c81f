"""Tests, mirroring the tree of the packages they test."""
