"""zoo's benchmark scripts; each prints a table and writes benchmarks/results/<name>.json (+ .png)."""
