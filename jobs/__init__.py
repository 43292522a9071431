"""Offline jobs: `llamagen sample`, generation at scale on Ray Data (docs/SAMPLING.md)."""
