"""SQL shipped with pgcg: numbered migrations and named queries, read with importlib.resources."""
