"""The towers as they were before ``ExpertBank``: each expert its own torchrec MLP, one after another (the
per-expert layout, whose state dicts and checkpoints must still load). A reference for tests only; the same
arguments, initialisation order and computation as before, trimmed to what the tests call.

Example::

    >>> tower = PerExpertMMoE(8, ["ctr", "cvr"], num_experts=2, expert_layer_sizes=[4])
    >>> tower.state_dict()["experts.1._mlp.0._linear.weight"].shape
    torch.Size([4, 8])
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.mlp import MLP

from torchrec_mtl.modules.tower_parts import Gate, TaskHeads


def make_experts(count: int, in_features: int, layer_sizes: Sequence[int]) -> nn.ModuleList:
    return nn.ModuleList([MLP(in_features, list(layer_sizes)) for _ in range(count)])


def mix(weights: torch.Tensor, expert_outputs: torch.Tensor) -> torch.Tensor:
    """weights [B, E] and outputs [B, E, D] give [B, D]."""
    return torch.bmm(weights.unsqueeze(1), expert_outputs).squeeze(1)


class PerExpertMMoE(nn.Module):
    def __init__(self, in_features: int, task_names: Sequence[str], num_experts: int = 4,
                 expert_layer_sizes: Sequence[int] = (128, 64), tower_layer_sizes: Sequence[int] = (32,),
                 gate_temperature: float = 1.0, expert_dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.task_names = list(task_names)
        self.experts = make_experts(num_experts, in_features, expert_layer_sizes)
        self.gates = nn.ModuleDict(
            {name: Gate(in_features, num_experts, gate_temperature, expert_dropout) for name in self.task_names}
        )
        self.heads = TaskHeads(list(expert_layer_sizes)[-1], self.task_names, tower_layer_sizes)

    def gate_weights(self, features: torch.Tensor, drop_experts: bool = False) -> Dict[str, torch.Tensor]:
        return {name: gate(features, drop_experts) for name, gate in self.gates.items()}

    def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        expert_outputs = torch.stack([expert(features) for expert in self.experts], dim=1)  # [B, E, D]
        weights = self.gate_weights(features, drop_experts=self.training)
        return self.heads({name: mix(task_weights, expert_outputs) for name, task_weights in weights.items()})


class PerExpertLevel(nn.Module):
    def __init__(self, in_features: int, task_names: Sequence[str], num_shared_experts: int, num_task_experts: int,
                 expert_layer_sizes: Sequence[int], shared_gate: bool) -> None:  # fmt: skip
        super().__init__()
        self.task_names = list(task_names)
        self.task_experts = nn.ModuleDict(
            {name: make_experts(num_task_experts, in_features, expert_layer_sizes) for name in self.task_names}
        )
        self.shared_experts = make_experts(num_shared_experts, in_features, expert_layer_sizes)
        self.task_gates = nn.ModuleDict(
            {name: Gate(in_features, num_task_experts + num_shared_experts) for name in self.task_names}
        )
        num_all = len(self.task_names) * num_task_experts + num_shared_experts
        self.shared_gate: Optional[Gate] = Gate(in_features, num_all) if shared_gate else None

    def gate_weights(self, task_inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {name: gate(task_inputs[name]) for name, gate in self.task_gates.items()}

    def forward(
        self, task_inputs: Dict[str, torch.Tensor], shared_input: torch.Tensor
    ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        shared = [expert(shared_input) for expert in self.shared_experts]
        own = {name: [expert(task_inputs[name]) for expert in experts] for name, experts in self.task_experts.items()}
        task_outputs = {
            name: mix(weights, torch.stack(own[name] + shared, dim=1))
            for name, weights in self.gate_weights(task_inputs).items()
        }
        if self.shared_gate is None:
            return task_outputs, None
        everything = torch.stack([out for name in self.task_names for out in own[name]] + shared, dim=1)
        return task_outputs, mix(self.shared_gate(shared_input), everything)


class PerExpertPLE(nn.Module):
    def __init__(self, in_features: int, task_names: Sequence[str], num_levels: int = 1, num_shared_experts: int = 2,
                 num_task_experts: int = 2, expert_layer_sizes: Sequence[int] = (128, 64),
                 tower_layer_sizes: Sequence[int] = (32,)) -> None:  # fmt: skip
        super().__init__()
        self.task_names = list(task_names)
        sizes: List[int] = list(expert_layer_sizes)
        self.levels = nn.ModuleList(
            [
                PerExpertLevel(in_features if level == 0 else sizes[-1], self.task_names, num_shared_experts,
                               num_task_experts, sizes, shared_gate=level < num_levels - 1)  # fmt: skip
                for level in range(num_levels)
            ]
        )
        self.heads = TaskHeads(sizes[-1], self.task_names, tower_layer_sizes)

    def _last_level_inputs(self, features: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        task_inputs, shared_input = {name: features for name in self.task_names}, features
        for level in self.levels[:-1]:
            task_inputs, shared_input = level(task_inputs, shared_input)
        return task_inputs, shared_input

    def gate_weights(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.levels[-1].gate_weights(self._last_level_inputs(features)[0])

    def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        task_inputs, shared_input = self._last_level_inputs(features)
        return self.heads(self.levels[-1](task_inputs, shared_input)[0])
