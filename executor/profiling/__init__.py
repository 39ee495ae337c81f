"""Measuring: the per-layer profiler (chains and graphs), its timing harness, and calibration."""
