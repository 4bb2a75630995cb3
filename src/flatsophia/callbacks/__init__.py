"""Lightning callbacks of the template (diagnostics that do not change the training trajectory)."""

from .sharpness import SharpnessCallback, hessian_top_eig_and_trace

__all__ = ["SharpnessCallback", "hessian_top_eig_and_trace"]
