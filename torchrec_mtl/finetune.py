"""Fine-tuning one task from a jointly trained checkpoint: the last step of multi-task representation learning.

``finetune: {checkpoint: runs/main/checkpoints, task: ctr, freeze: [embeddings, experts, gates]}`` in a job config
loads the joint model's weights (not its optimizers or data position), trains only ``task``'s loss (every other
task and product keeps weight 0: evaluated, not trained) and keeps the named parts as they were:

=============  ===========================================================================================
part           parameters
=============  ===========================================================================================
``embeddings`` every embedding table (their fused optimizers get learning rate 0)
``dense_arch`` the dense features' MLP
``text``       the item-text projection
``experts``    the tower's experts (MMoE, PLE's task and shared experts, the shared bottom)
``gates``      the tower's gates
``heads``      the per-task heads
``retrieval``  the two-tower arch's user and item towers
=============  ===========================================================================================

The run reports every task's test metrics before and after, so what the specialised model gave up shows beside
what it gained.

Example::

    >>> config = for_task(load_config("configs/mmoe_synthetic.yaml"), "ctr")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from typing import Iterable, List

from torch import nn

FREEZABLE = ("embeddings", "dense_arch", "text", "sequence", "experts", "gates", "heads", "retrieval")


def part_of(name: str) -> str:
    """The freezable part a MultiTaskModel parameter (``name`` as ``named_parameters`` gives it) belongs to."""
    if name.startswith("sparse_arch.") or "embedding_bags" in name:
        return "embeddings"
    if name.startswith("dense_arch."):
        return "dense_arch"
    if name.startswith("item_text."):
        return "text"
    if name.startswith("interest."):  # the attention over sequence features (model.sequence)
        return "sequence"
    if name.startswith("retrieval."):
        return "retrieval"
    if name.startswith("tower.heads."):
        return "heads"
    if "gate" in name:
        return "gates"
    return "experts"  # the rest of the tower: experts, PLE's levels, the shared bottom


def freeze(model: nn.Module, parts: Iterable[str]) -> List[str]:
    """Stop gradients into the dense ``parts`` of ``model`` (a MultiTaskModel, before sharding); returns the frozen
    parameters' names. Embedding tables are frozen through their optimizers' learning rate instead."""
    parts = set(parts)
    frozen = []
    for name, parameter in model.named_parameters():
        part = part_of(name)
        if part != "embeddings" and part in parts:
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def for_task(config, task: str):
    """``config`` with every loss weight 0 but ``task``'s (a task or a product; weight 1 if it had 0)."""
    config = copy.deepcopy(config)
    objective = config.objective
    for name, spec in [*objective.tasks.items(), *objective.products.items()]:
        spec.weight = (spec.weight or 1.0) if name == task else 0.0
    for order in objective.orders:
        order.weight = 0.0
    return config
