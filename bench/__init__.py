"""Benchmarks (`llamagen bench ...`): scripts that measure, never tests that assert timings."""
