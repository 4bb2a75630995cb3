"""LightningModules of the template."""

from .optim_module import OptimLitModule

__all__ = ["OptimLitModule"]
