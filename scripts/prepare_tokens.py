#!/usr/bin/env python
"""Write token files (train.bin, val.bin, meta.json) for ``data=tokens`` from text.

Usage::

    python scripts/prepare_tokens.py --tokenizer gpt2 --hf-dataset openwebtext --out data/openwebtext
    python scripts/prepare_tokens.py --tokenizer bytes --text a.txt b.txt --out data/mytext

All options: ``--help``; the logic is in :mod:`flatsophia.data.prepare_tokens`.
"""

from __future__ import annotations

from flatsophia.data.prepare_tokens import main

if __name__ == "__main__":
    main()
