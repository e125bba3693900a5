"""Side-by-side benchmarks against other engines (llama.cpp).  Not packaged, not run in CI.

Run from the repository root, e.g. `.venv/bin/python -m bench.side_by_side --help`.
"""
