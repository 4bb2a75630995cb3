#!/usr/bin/env python
"""Noise of the diagonal-Hessian estimate against the share of the batch a refresh uses (``--help``)."""

from flatsophia.experiments.estimate_noise import main

if __name__ == "__main__":
    main()
