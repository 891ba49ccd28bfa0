"""The toy-world benchmark behind `d2l bench toy`: one call, no Prefect state of its own."""
from __future__ import annotations


def run_toy_benchmark(argv: list[str]) -> int:
    """Run the toy-world benchmark (model/toy/bench.py) with command-line style arguments; its exit code."""
    from model.toy.bench import main

    return main(argv)
