"""How per-task loss terms add up to the one loss the pipeline backpropagates.

- ``static``: ``sum_i w_i * L_i`` with the configured weights.
- ``uncertainty`` (Kendall, Gal and Cipolla, CVPR 2018): each term gets a learned log-variance ``s_i`` and contributes
  ``w_i * (exp(-s_i) * L_i + s_i)``; at the optimum ``s_i = log L_i``, so a term's effective weight
  ``w_i * exp(-s_i)`` falls as its loss (its noise) grows. The ``s_i`` are dense parameters trained by the dense
  optimizer like any other.
- ``gradnorm`` (Chen et al., ICML 2018): multipliers ``m_i`` (summing to the number of terms) are moved every
  training step so that each term's gradient norm on the tower's shared parameters, ``||grad_W w_i m_i L_i||``,
  approaches the mean norm times ``r_i ** alpha``, where ``r_i`` is the term's loss relative to its first-step loss
  over the mean of those ratios: a term that trains slower gets a larger multiplier.

``static`` and ``uncertainty`` act on the total loss only, so they reach every parameter, the sharded embedding tables
included: fused embedding optimizers (TorchRec's TBE) update rows inside backward from the gradient of this total,
scaled by the same effective weights as the dense ones. ``gradnorm`` needs each term's gradient separately, which
fused embedding optimizers never materialise (tables sharded table-, row- or column-wise are updated inside backward
and keep no ``.grad``; tests/test_weighting.py checks it; small tables the planner makes data-parallel do), so it
measures gradient norms on the tower's shared dense parameters only (``shared_parameters()``: MMoE's experts,
PLE's shared experts, the shared bottom); the multipliers it sets then scale every parameter's gradient, tables
included. It costs one extra backward pass per term through the tower each step.

Example::

    >>> weighting = UncertaintyWeighting({"ctr": 1.0, "rating": 0.5})
    >>> total = weighting({"ctr": torch.tensor(0.3), "rating": torch.tensor(2.0)})
    >>> sorted(weighting.effective_weights())
    ['ctr', 'rating']
"""

from __future__ import annotations

from typing import Dict, List, Type

import torch
import torch.distributed as dist
from torch import nn



def flat_gradient(loss: torch.Tensor, parameters: List[nn.Parameter]) -> torch.Tensor:
    """d loss / d parameters as one detached vector (zeros for parameters the loss does not reach); the graph is
    kept, so the pipeline's backward of the total loss still runs afterwards."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, parameters, strict=True)]
    ).detach()


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


class GradNormWeighting(nn.Module):
    """GradNorm multipliers on the static weights, updated inside the training forward (no optimizer of their own).

    Args:
        weights: static weight per term (terms with weight 0 are skipped).
        alpha: the restoring force towards equal training rates (the paper's default 1.5).
        lr: step size of the multipliers.
    """

    def __init__(self, weights: Dict[str, float], alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        self.weights = {name: float(weight) for name, weight in weights.items() if weight}
        self.alpha, self.lr = alpha, lr
        n = len(self.weights)
        # buffers: kept with the model, broadcast by DDP, never touched by an optimizer
        self.register_buffer("multipliers", torch.ones(n))
        self.register_buffer("initial_losses", torch.zeros(n))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.shared: List[nn.Parameter] = []

    def attach(self, shared_parameters: List[nn.Parameter]) -> None:
        """The dense parameters all tasks share, on which gradient norms are measured."""
        self.shared = [p for p in shared_parameters if p.requires_grad]
        if not self.shared:
            raise ValueError("weighting: gradnorm needs a tower with shared parameters (not single_task)")

    def forward(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        names = list(self.weights)
        static = torch.tensor([self.weights[n] for n in names], device=self.multipliers.device)
        terms = [losses[n] for n in names]
        stacked = torch.stack(terms)
        if self.training and torch.is_grad_enabled() and self.shared:
            self._update(terms, static)
        return (static * self.multipliers.detach() * stacked).sum()

    @torch.no_grad()
    def _update(self, terms: List[torch.Tensor], static: torch.Tensor) -> None:
        # each term as forward built it: under no_grad an index into a stacked tensor would have no graph
        norms = [flat_gradient(term, self.shared).double().pow(2).sum().sqrt().float() for term in terms]
        raw = torch.stack(norms)  # ||grad_W L_i||
        observed = torch.stack(terms).detach()
        if dist.is_initialized() and dist.get_world_size() > 1:
            for tensor in (raw, observed):
                dist.all_reduce(tensor)
                tensor /= dist.get_world_size()
        if int(self.steps) == 0:
            self.initial_losses.copy_(observed.clamp(min=1e-8))
        ratio = observed / self.initial_losses
        relative_rate = ratio / ratio.mean()
        norms_now = static * self.multipliers * raw  # G_i
        target = norms_now.mean() * relative_rate**self.alpha
        # d/dm_i sum_j |G_j - target_j| with the target held fixed, in units of the mean norm so that ``lr`` is a
        # step size whatever the scale of the gradients
        gradient = torch.sign(norms_now - target) * static * raw / (static * raw).mean().clamp(min=1e-12)
        self.multipliers.sub_(self.lr * gradient).clamp_(min=1e-3)
        self.multipliers.mul_(len(terms) / self.multipliers.sum())
        self.steps += 1

    def effective_weights(self) -> Dict[str, float]:
        return {name: weight * float(m) for (name, weight), m in zip(self.weights.items(), self.multipliers)}


# The one registry of weightings: ``objective.weighting`` names a key; each class takes the terms' weights.
WEIGHTINGS: Dict[str, Type[nn.Module]] = {
    "static": StaticWeighting,
    "uncertainty": UncertaintyWeighting,
    "gradnorm": GradNormWeighting,
}


def make_weighting(kind: str, weights: Dict[str, float]) -> nn.Module:
    """The weighting ``kind`` (a key of ``WEIGHTINGS``) over the terms' ``weights``."""
    if kind not in WEIGHTINGS:
        raise ValueError(f"weighting: {kind!r}; allowed: {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[kind](weights)
