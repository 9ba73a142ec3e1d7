"""The HTTP API: the public contract (schemas), routes, probes and middleware."""
