"""Smoke tests of the tools."""
