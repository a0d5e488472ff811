"""Benchmark scripts (not tests): `python -m benchmarks.run` runs them all (`make bench`)."""
