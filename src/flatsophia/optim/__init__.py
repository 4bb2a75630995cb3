"""Second-order optimizers as plain ``torch.optim.Optimizer`` subclasses.

One file per algorithm holds the class and its functional step (e.g. ``sophia_g.sophia_g``), as in
``torch.optim``. Each optimizer of the Sophia family has ``hessian_estimator`` (``"gnb"`` or
``"hutchinson"``), ``update_hessian(...)`` to fold a fresh diagonal-Hessian estimate into its state,
and ``stats()`` returning diagnostics as 0-d tensors. :mod:`flatsophia.optim.factory` holds the registry.
"""

from .factory import ALIASES, OPTIMIZERS, OptimizerSpec, create_optimizer, get_spec, param_groups, spec_for
from .flat_sophia import FlatSophia
from .soap import SOAP
from .sophia_g import SophiaG
from .sophia_h import SophiaH

__all__ = [
    "SophiaG",
    "SophiaH",
    "FlatSophia",
    "SOAP",
    "OPTIMIZERS",
    "ALIASES",
    "OptimizerSpec",
    "create_optimizer",
    "get_spec",
    "param_groups",
    "spec_for",
]
