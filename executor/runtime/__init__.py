"""The pipeline runtime: stages, the action interpreter, micro-batches, the local runner and its pieces."""
