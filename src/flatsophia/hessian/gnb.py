"""Gauss-Newton-Bartlett estimator (Sophia-G): gradient of the loss on labels sampled from the model.

Liu et al. 2023 (arXiv:2305.14342), Algorithm 2: sample ``yhat ~ softmax(logits)``, take the gradient
``ghat`` of the mean cross-entropy on those labels; ``B * ghat * ghat`` estimates the Gauss-Newton
diagonal. As in the authors' code the optimizer squares ``ghat`` itself and applies ``B`` through its
``bs`` argument, so this estimator returns ``ghat``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .base import HessianEstimator


class GaussNewtonBartlett(HessianEstimator):
    """Sampled-label gradient for categorical outputs (classification and language modelling).

    The ``forward`` closure must return logits shaped ``(..., num_classes)``; the training loss
    is not used (it only has to be a cross-entropy over the same logits, which the caller checks).
    Positions whose training label is ``ignore_index`` can be excluded by passing ``valid_mask``.
    """

    name = "gnb"

    def __call__(
        self,
        forward: Callable[[], torch.Tensor],
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None,
        params: Sequence[torch.Tensor],
        valid_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor | None]:
        params = list(params)
        with torch.enable_grad():
            logits = forward()
            if not isinstance(logits, torch.Tensor) or logits.ndim < 2 or not logits.is_floating_point():
                raise ValueError(
                    "Gauss-Newton-Bartlett needs categorical logits shaped (..., num_classes) to sample "
                    f"labels from; got {getattr(logits, 'shape', type(logits).__name__)}. For other losses "
                    "use the Hutchinson estimator (hessian=hutchinson, e.g. optimizer=sophia_h)."
                )
            flat = logits.reshape(-1, logits.shape[-1])
            with torch.no_grad():
                probs = torch.softmax(flat.float(), dim=-1)
                yhat = torch.multinomial(probs, 1, generator=self.generator(probs.device)).squeeze(-1)
                if valid_mask is not None:
                    yhat = torch.where(valid_mask.reshape(-1), yhat, torch.full_like(yhat, -100))
            loss = F.cross_entropy(flat, yhat, ignore_index=-100)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return list(grads)
