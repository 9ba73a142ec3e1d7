"""Load benchmarks for dspy-service: `make bench` (`python -m bench.run`)."""
