"""Offline jobs: `llamagen sample`, generation at scale on Ray Data (the README's "Sampling at
scale")."""
