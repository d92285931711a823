"""Multi-task towers: a dense input in, one logit per task out, by name.

Each tower is a plain nn.Module, so it drops into any TorchRec model after the sparse and dense archs.

Example::

    >>> tower = MMoE(in_features=64, task_names=["ctr", "cvr"], num_experts=4, expert_layer_sizes=[32, 16])
    >>> logits = tower(torch.randn(8, 64))
    >>> sorted(logits), logits["ctr"].shape
    (['ctr', 'cvr'], torch.Size([8]))
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torchrec.modules.mlp import MLP


class TaskHeads(nn.Module):
    """One small MLP per task ending in a single output unit."""

    def __init__(self, in_features: int, task_names: List[str], layer_sizes: List[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(
                    MLP(in_features, layer_sizes) if layer_sizes else nn.Identity(),
                    nn.Linear(layer_sizes[-1] if layer_sizes else in_features, 1),
                )
                for name in task_names
            }
        )

    def forward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {name: head(inputs[name]).squeeze(-1) for name, head in self.heads.items()}


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018): shared experts, one softmax gate per task.

    Experts are separate MLPs, each with its own random initialisation, so they start different.

    Args:
        in_features: width of the input.
        task_names: one gate and one head per name.
        num_experts: number of shared experts.
        expert_layer_sizes: hidden sizes of each expert; the last is the expert output width.
        tower_layer_sizes: hidden sizes of each task's head before its output unit.
    """

    def __init__(
        self,
        in_features: int,
        task_names: List[str],
        num_experts: int = 4,
        expert_layer_sizes: List[int] = (128, 64),
        tower_layer_sizes: List[int] = (32,),
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts: must be at least 1, got {num_experts}")
        self.task_names = list(task_names)
        self.experts = nn.ModuleList([MLP(in_features, list(expert_layer_sizes)) for _ in range(num_experts)])
        self.gates = nn.ModuleDict({name: nn.Linear(in_features, num_experts) for name in self.task_names})
        self.heads = TaskHeads(expert_layer_sizes[-1], self.task_names, list(tower_layer_sizes))

    def gate_weights(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-task softmax weights over the experts, [B, num_experts] each."""
        return {name: torch.softmax(gate(features), dim=-1) for name, gate in self.gates.items()}

    def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        expert_outputs = torch.stack([expert(features) for expert in self.experts], dim=1)  # [B, E, D]
        mixed = {
            name: torch.bmm(weights.unsqueeze(1), expert_outputs).squeeze(1)
            for name, weights in self.gate_weights(features).items()
        }
        return self.heads(mixed)


class SharedBottom(nn.Module):
    """One shared MLP, then one head per task (Caruana 1997)."""

    def __init__(
        self,
        in_features: int,
        task_names: List[str],
        bottom_layer_sizes: List[int] = (128, 64),
        tower_layer_sizes: List[int] = (32,),
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.bottom = MLP(in_features, list(bottom_layer_sizes))
        self.heads = TaskHeads(bottom_layer_sizes[-1], self.task_names, list(tower_layer_sizes))

    def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        shared = self.bottom(features)
        return self.heads({name: shared for name in self.task_names})
