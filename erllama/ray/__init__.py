"""erllama on more than one machine (issue 15, in progress): :mod:`erllama.ray.routing`, the
pure scoring of a prefix-aware Ray Serve router. The deployment, the router class and the
shared cold tier come next; this package imports nothing of Ray yet."""
