"""Benchmarks of the optimizers (step, Hessian refresh, training iteration, memory).

Run with ``scripts/benchmark.py``.
"""
