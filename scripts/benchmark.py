#!/usr/bin/env python
"""Benchmark the optimizers: ``python scripts/benchmark.py --help`` (same as ``python -m flatsophia.bench``)."""

from flatsophia.bench.cli import main

if __name__ == "__main__":
    main()
