"""Benchmarks: our path against a bare baseline in the same run. `make bench`."""
