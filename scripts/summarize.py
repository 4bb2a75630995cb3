#!/usr/bin/env python
"""Summarize a Hydra multirun of ``src/train.py``: a Markdown table (``summary.md``) and plots.

Usage::

    python scripts/summarize.py logs/train/multiruns/<stamp> [--metric val/loss] [--target 0.5]
        [--pair flat_sophia,sophia_h] [--out DIR] [--mode min|max] [--band minmax|std]

Writes ``summary.md``, ``val_loss.png`` (and ``val_acc.png`` / ``sharpness.png`` when logged) to
``--out`` (default: the sweep folder) and prints the table. The logic (and what every number means)
is in :mod:`flatsophia.experiments.summarize`.
"""

from __future__ import annotations

from flatsophia.experiments.summarize import main

if __name__ == "__main__":
    main()
