"""Ready-made workloads: the built-in models, data sets and training jobs of the paper's two tasks."""
