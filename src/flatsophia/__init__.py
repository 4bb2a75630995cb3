"""flatsophia: second-order optimizers for PyTorch and a Hydra + Lightning template to compare them.

The optimizer library (:mod:`flatsophia.optim`) and the Hessian estimators (:mod:`flatsophia.hessian`)
are plain PyTorch and import neither Lightning nor Hydra.
"""

__version__ = "0.1.0"
