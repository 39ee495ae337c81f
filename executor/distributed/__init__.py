"""One rank per stage: the distributed runner, its transport, local rank spawning and the launcher."""
