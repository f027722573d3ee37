"""Benchmark ``analyze`` (same as ``latentharmonize bench``): python Testing/benchmarks/bench_analyze.py [--full]."""
from __future__ import annotations

import sys

from latentharmonize.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
