"""One-off profilers and studies (not the user-facing benchmark): each module runs as ``python -m vltok.eval.tools.NAME``
and writes the table it measured (eval/results/README.md lists them with their commands)."""
