#!/usr/bin/env python
"""Accuracy of Hutchinson's Hessian-vector products per training precision (``--help``)."""

from flatsophia.experiments.hvp_precision import main

if __name__ == "__main__":
    main()
