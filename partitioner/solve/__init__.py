"""Solvers: the exact chain DP, the CP-SAT graph partitioner, the planner and the search."""
