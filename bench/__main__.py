"""`python -m pgcg.bench drain …`, the same as `pgcg bench drain …`."""

from pgcg.bench.cli import bench

if __name__ == "__main__":
    bench(prog_name="python -m pgcg.bench")
