"""Lightning callbacks of the template: diagnostics and bookkeeping that do not change the training trajectory."""

from .preemption import Requeued, SlurmRequeue, Terminated
from .resume import ExactResume
from .sharpness import SharpnessCallback, hessian_top_eig_and_trace
from .stop import ValidateAtMaxSteps
from .throughput import LMThroughput, model_flops_per_token, peak_tflops

__all__ = [
    "ExactResume",
    "LMThroughput",
    "Requeued",
    "SharpnessCallback",
    "SlurmRequeue",
    "Terminated",
    "ValidateAtMaxSteps",
    "hessian_top_eig_and_trace",
    "model_flops_per_token",
    "peak_tflops",
]
