"""The toy-world benchmark as a script: `python benchmarks/toy_world.py [--smoke] [--seed N] ...`.

The benchmark itself lives in model/toy/bench.py (it is also `d2l bench toy`); this file only runs it.
"""
from __future__ import annotations

import sys

from model.toy.bench import main

if __name__ == "__main__":
    sys.exit(main())
