"""Benchmarks of the optimizers as users run them: ``python -m flatsophia.bench --help``.

* :mod:`~flatsophia.bench.workloads`: the models (the project's own components) on a fixed batch,
  and the optimizers (the registry, fused AdamW as the reference, the authors' SophiaG);
* :mod:`~flatsophia.bench.timing`: interleaved rounds, paired ratios, confidence intervals;
* :mod:`~flatsophia.bench.sections`: iteration, refresh, step, state, memory;
* :mod:`~flatsophia.bench.cli`: the command line and the JSON;
* :mod:`~flatsophia.bench.report`: Markdown tables from a JSON (the tables of ``docs/performance.md``).
"""
