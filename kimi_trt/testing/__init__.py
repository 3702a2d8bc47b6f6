"""Helpers for the test suite and benchmarks only: independent references and fixtures."""
