"""Lightning callbacks of the template (diagnostics that do not change the training trajectory)."""

from .sharpness import SharpnessCallback, hessian_top_eig_and_trace
from .stop import ValidateAtMaxSteps

__all__ = ["SharpnessCallback", "ValidateAtMaxSteps", "hessian_top_eig_and_trace"]
