"""vltok.demos: demo apps."""
