"""FGM adversarial training on the looked-up embeddings (Goodfellow et al., ICLR 2015; Miyato et al., ICLR 2017).

Each training step, the clean loss's gradient with respect to every example's pooled ID embeddings and projected
item-text vector is the direction that raises the loss fastest. Those vectors are moved ``epsilon`` along it (per
example: the unit L2 direction over all of that example's perturbed vectors, detached), the dense part after the
lookups (interaction, tower, two-tower arch) runs again, and the step trains on clean + adversarial loss.

The perturbation is added after the lookup (and after the sharded output distribution), so the sharded tables are
untouched and nothing is looked up twice: the pipeline's one backward sends each table row the gradient of both
passes and the fused optimizer updates it once. ``torch.autograd.grad`` stops at the embeddings, so it runs no table
backward and no DDP hook.

Example::

    >>> ids = torch.randn(4, 3, 8, requires_grad=True)
    >>> text = torch.randn(4, 8, requires_grad=True)
    >>> loss = (ids**2).sum() + text.sum()
    >>> r_ids, r_text = fgm_perturbations(loss, [ids, text], epsilon=0.5)
    >>> [round(float(n), 4) for n in torch.cat([r_ids.flatten(1), r_text], dim=1).norm(dim=1)]
    [0.5, 0.5, 0.5, 0.5]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from torchrec_mtl.data.batch import MultiTaskBatch

Output = Tuple[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]


def fgm_perturbations(loss: torch.Tensor, inputs: Sequence[torch.Tensor], epsilon: float) -> List[torch.Tensor]:
    """``epsilon * g / ||g||`` for each of ``inputs`` (each [B, ...]), ``g`` the gradient of ``loss`` and the norm
    taken per row over all of them together; detached. A row with a zero gradient (padding) is left in place."""
    grads = torch.autograd.grad(loss, list(inputs), retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
    norm = torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1).norm(dim=1)
    # a zero norm only where every gradient of the row is zero: divide by anything positive, the result is 0
    scale = epsilon / norm.clamp(min=torch.finfo(norm.dtype).tiny)
    return [(g * scale.view(-1, *[1] * (g.dim() - 1))).detach() for g in grads]


def _loss_alone(objective: nn.Module, outputs: Dict[str, torch.Tensor], batch: MultiTaskBatch) -> torch.Tensor:
    """The objective's loss without its side effects (diagnostics, GradNorm's step, the last terms) where it offers
    that (MultiTaskObjective.loss); otherwise its forward's loss."""
    loss_only = getattr(objective, "loss", None)
    return loss_only(outputs, batch) if callable(loss_only) else objective(outputs, batch)[0]


@torch.fx.wrap
def adversarial_loss(
    model: nn.Module,
    objective: nn.Module,
    embedded: Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
    batch: MultiTaskBatch,
    epsilon: float,
) -> Output:
    """One FGM training step's output: ``(clean + adversarial loss, (that loss detached, predictions, labels))``,
    predictions and labels those of the clean pass. ``embedded`` is ``MultiTaskModel.embed``'s output and ``model``
    the MultiTaskModel whose ``head`` runs on it.

    One call in a traced graph (the pipeline traces MultiTaskTrain.forward to find the sharded lookups, which are
    all in ``embed``): what happens here needs real tensors.
    """
    embedded_dense, embedded_ids, text = embedded
    clean, (_, predictions, labels) = objective(model.head(embedded_dense, embedded_ids, text), batch)
    if not torch.is_grad_enabled():  # a training-mode forward under no_grad: nothing to take a gradient of
        return clean, (clean.detach(), predictions, labels)
    inputs = [embedded_ids] if text is None else [embedded_ids, text]
    inputs = [x for x in inputs if x.requires_grad]  # all frozen: nothing to perturb
    if not inputs:
        return clean, (clean.detach(), predictions, labels)
    shifts = fgm_perturbations(clean, inputs, epsilon)
    shifted = {id(x): x + shift for x, shift in zip(inputs, shifts, strict=True)}
    perturbed_ids = shifted.get(id(embedded_ids), embedded_ids)
    perturbed_text = None if text is None else shifted.get(id(text), text)
    total = clean + _loss_alone(objective, model.head(embedded_dense, perturbed_ids, perturbed_text), batch)
    return total, (total.detach(), predictions, labels)
