"""Benchmarks: each prints ratios measured in one run (python benchmarks/NAME.py --help)."""
