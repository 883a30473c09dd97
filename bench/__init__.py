"""Benchmarks: `pgcg bench drain`, `pgcg bench rebalance`."""
