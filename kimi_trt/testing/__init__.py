"""Helpers shared by the test suite and benchmarks (independent references, fixtures)."""
