"""The schedule IR, its generators and the execution rules every layer shares (no torch)."""
