"""vltok.eval: the shapes benchmark, the eval runner and benchmarks."""
