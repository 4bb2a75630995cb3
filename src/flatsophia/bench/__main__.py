"""``python -m flatsophia.bench``: see :mod:`flatsophia.bench.cli`."""

from .cli import main

main()
