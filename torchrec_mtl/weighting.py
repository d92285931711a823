"""How per-task loss terms add up to the one loss the pipeline backpropagates.

- ``static``: ``sum_i w_i * L_i`` with the configured weights.
- ``uncertainty`` (Kendall, Gal and Cipolla, CVPR 2018): each term gets a learned log-variance ``s_i`` and contributes
  ``w_i * (exp(-s_i) * L_i + s_i)``; at the optimum ``s_i = log L_i``, so a term's effective weight
  ``w_i * exp(-s_i)`` falls as its loss (its noise) grows. The ``s_i`` are dense parameters trained by the dense
  optimizer like any other.

Both act on the total loss only, so they reach every parameter, the sharded embedding tables included: fused
embedding optimizers (TorchRec's TBE) update rows inside backward from the gradient of this total, and the gradient
of each table is scaled by the same effective weights as the dense ones. Gradient-level methods (GradNorm, PCGrad)
differ: they need each task's gradient separately, which fused embedding optimizers never materialise, so they can
act on dense shared parameters only.

Example::

    >>> weighting = UncertaintyWeighting({"ctr": 1.0, "rating": 0.5})
    >>> total = weighting({"ctr": torch.tensor(0.3), "rating": torch.tensor(2.0)})
    >>> sorted(weighting.effective_weights())
    ['ctr', 'rating']
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

WEIGHTINGS = ("static", "uncertainty")


class StaticWeighting(nn.Module):
    """``sum_i w_i * L_i``; a term whose weight is 0 is skipped (its loss need not even be finite)."""

    def __init__(self, weights: Dict[str, float]) -> None:
        super().__init__()
        self.weights = dict(weights)

    def forward(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * loss for name, loss in losses.items() if self.weights.get(name, 0.0))

    def effective_weights(self) -> Dict[str, float]:
        return {name: float(weight) for name, weight in self.weights.items() if weight}


class UncertaintyWeighting(nn.Module):
    """Learned homoscedastic-uncertainty weights: ``sum_i w_i * (exp(-s_i) * L_i + s_i)`` over terms with w_i > 0."""

    def __init__(self, weights: Dict[str, float]) -> None:
        super().__init__()
        self.weights = {name: float(weight) for name, weight in weights.items() if weight}
        self.log_variance = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in self.weights})

    def forward(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=next(iter(losses.values())).device)
        for name, weight in self.weights.items():
            s = self.log_variance[name]
            total = total + weight * (torch.exp(-s) * losses[name] + s)
        return total

    def effective_weights(self) -> Dict[str, float]:
        """Each term's current multiplier of its loss, ``w_i * exp(-s_i)``."""
        return {name: weight * float(torch.exp(-self.log_variance[name])) for name, weight in self.weights.items()}


def make_weighting(kind: str, weights: Dict[str, float]) -> nn.Module:
    if kind == "static":
        return StaticWeighting(weights)
    if kind == "uncertainty":
        return UncertaintyWeighting(weights)
    raise ValueError(f"weighting: {kind!r}; allowed: {', '.join(WEIGHTINGS)}")
