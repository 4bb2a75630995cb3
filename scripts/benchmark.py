#!/usr/bin/env python
"""Benchmark the optimizers: ``python scripts/benchmark.py --help`` (the code is :mod:`flatsophia.bench`)."""

import sys

from flatsophia.bench.benchmark import main

if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
