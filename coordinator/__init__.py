"""The coordinator: leader election, assignment and fenced rebalancing."""
