"""The cost model: what stages cost, in time and memory, given a profile and a configuration."""
