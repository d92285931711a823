"""Multi-task towers: a dense input in, one logit per task out, by name.

Each tower is a plain nn.Module, so it drops into any TorchRec model after the sparse and dense archs. Every tower's
``forward(features [B, in_features])`` returns ``{task_name: logit [B]}`` in ``task_names`` order; ``TOWERS`` maps a
config name to its class.

Example::

    >>> tower = MMoE(in_features=64, task_names=["ctr", "cvr"], num_experts=4, expert_layer_sizes=[32, 16])
    >>> logits = tower(torch.randn(8, 64))
    >>> sorted(logits), logits["ctr"].shape
    (['ctr', 'cvr'], torch.Size([8]))
    >>> ple = PLE(64, ["ctr", "cvr"], num_levels=2, num_shared_experts=1, num_task_experts=2, expert_layer_sizes=[16])
    >>> {name: weights.shape for name, weights in ple.gate_weights(torch.randn(8, 64)).items()}
    {'ctr': torch.Size([8, 3]), 'cvr': torch.Size([8, 3])}
    >>> sorted(TOWERS)
    ['mmoe', 'ple', 'shared_bottom', 'single_task']
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedTensor

# A tower's input: a dense [B, in_features] tensor, or a KeyedTensor (e.g. an EmbeddingBagCollection's output) whose
# values() are that tensor.
TowerInput = Union[torch.Tensor, KeyedTensor]


def _task_list(task_names: Sequence[str]) -> List[str]:
    """``task_names`` as a list, refusing a bare string, an empty list and repeated names."""
    if isinstance(task_names, str):
        raise TypeError(f"task_names: expected a list of names, got the string {task_names!r}")
    names = list(task_names)
    if not names:
        raise ValueError("task_names: must name at least one task, got an empty list")
    if len(set(names)) != len(names):
        raise ValueError(f"task_names: names must be unique, got {names}")
    return names


def _check_at_least_one(argument: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{argument}: must be at least 1, got {value}")


def _layer_sizes(argument: str, sizes: Sequence[int], allow_empty: bool = False) -> List[int]:
    sizes = list(sizes)
    if not sizes and not allow_empty:
        raise ValueError(f"{argument}: needs at least one layer size, got {sizes}")
    if any(size < 1 for size in sizes):
        raise ValueError(f"{argument}: every layer size must be at least 1, got {sizes}")
    return sizes


def _experts(count: int, in_features: int, layer_sizes: Sequence[int]) -> nn.ModuleList:
    """``count`` separate MLPs, each with its own random initialisation, so they start different."""
    return nn.ModuleList([MLP(in_features, list(layer_sizes)) for _ in range(count)])


def _as_tensor(features: TowerInput) -> torch.Tensor:
    return features.values() if isinstance(features, KeyedTensor) else features


def _mix(weights: torch.Tensor, expert_outputs: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of expert outputs: weights [B, E] and outputs [B, E, D] give [B, D]."""
    return torch.bmm(weights.unsqueeze(1), expert_outputs).squeeze(1)


class TaskHeads(nn.Module):
    """One small MLP per task ending in a single output unit."""

    def __init__(self, in_features: int, task_names: List[str], layer_sizes: Sequence[int]) -> None:
        super().__init__()
        layer_sizes = list(layer_sizes)
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


class SingleTask(nn.Module):
    """The single-task baseline: one independent bottom MLP and head per task, no parameter shared between tasks.

    The usual reference point of the multi-task papers (e.g. Ma et al., KDD 2018; Tang et al., RecSys 2020): the
    tasks are trained side by side but cannot help (or hurt) each other.

    Args:
        in_features: width of the input.
        task_names: one bottom and one head per name.
        expert_layer_sizes: hidden sizes of each task's bottom MLP; the last is its output width.
        tower_layer_sizes: hidden sizes of each task's head before its output unit.
    """

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        expert_layer_sizes: Sequence[int] = (128, 64),
        tower_layer_sizes: Sequence[int] = (32,),
    ) -> None:
        super().__init__()
        self.task_names = _task_list(task_names)
        _check_at_least_one("in_features", in_features)
        expert_layer_sizes = _layer_sizes("expert_layer_sizes", expert_layer_sizes)
        tower_layer_sizes = _layer_sizes("tower_layer_sizes", tower_layer_sizes, allow_empty=True)
        self.bottoms = nn.ModuleDict({name: MLP(in_features, expert_layer_sizes) for name in self.task_names})
        self.heads = TaskHeads(expert_layer_sizes[-1], self.task_names, tower_layer_sizes)

    def forward(self, features: TowerInput) -> Dict[str, torch.Tensor]:
        features = _as_tensor(features)
        return self.heads({name: bottom(features) for name, bottom in self.bottoms.items()})

    def shared_parameters(self) -> List[nn.Parameter]:
        """Parameters every task's output depends on: none here."""
        return []


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
        task_names: Sequence[str],
        num_experts: int = 4,
        expert_layer_sizes: Sequence[int] = (128, 64),
        tower_layer_sizes: Sequence[int] = (32,),
    ) -> None:
        super().__init__()
        self.task_names = _task_list(task_names)
        _check_at_least_one("in_features", in_features)
        _check_at_least_one("num_experts", num_experts)
        expert_layer_sizes = _layer_sizes("expert_layer_sizes", expert_layer_sizes)
        tower_layer_sizes = _layer_sizes("tower_layer_sizes", tower_layer_sizes, allow_empty=True)
        self.experts = _experts(num_experts, in_features, expert_layer_sizes)
        self.gates = nn.ModuleDict({name: nn.Linear(in_features, num_experts) for name in self.task_names})
        self.heads = TaskHeads(expert_layer_sizes[-1], self.task_names, tower_layer_sizes)

    def shared_parameters(self) -> List[nn.Parameter]:
        """Parameters every task's output depends on: the experts."""
        return list(self.experts.parameters())

    def gate_weights(self, features: TowerInput) -> Dict[str, torch.Tensor]:
        """Per-task softmax weights over the experts, [B, num_experts] each; every row sums to 1."""
        features = _as_tensor(features)
        return {name: torch.softmax(gate(features), dim=-1) for name, gate in self.gates.items()}

    def forward(self, features: TowerInput) -> Dict[str, torch.Tensor]:
        features = _as_tensor(features)
        expert_outputs = torch.stack([expert(features) for expert in self.experts], dim=1)  # [B, E, D]
        mixed = {name: _mix(weights, expert_outputs) for name, weights in self.gate_weights(features).items()}
        return self.heads(mixed)


class SharedBottom(nn.Module):
    """One shared MLP, then one head per task (Caruana 1997)."""

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        bottom_layer_sizes: Sequence[int] = (128, 64),
        tower_layer_sizes: Sequence[int] = (32,),
    ) -> None:
        super().__init__()
        self.task_names = _task_list(task_names)
        _check_at_least_one("in_features", in_features)
        bottom_layer_sizes = _layer_sizes("bottom_layer_sizes", bottom_layer_sizes)
        tower_layer_sizes = _layer_sizes("tower_layer_sizes", tower_layer_sizes, allow_empty=True)
        self.bottom = MLP(in_features, bottom_layer_sizes)
        self.heads = TaskHeads(bottom_layer_sizes[-1], self.task_names, tower_layer_sizes)

    def shared_parameters(self) -> List[nn.Parameter]:
        """Parameters every task's output depends on: the bottom."""
        return list(self.bottom.parameters())

    def forward(self, features: TowerInput) -> Dict[str, torch.Tensor]:
        features = _as_tensor(features)
        shared = self.bottom(features)
        return self.heads({name: shared for name in self.task_names})


class ExtractionLevel(nn.Module):
    """One extraction level of PLE, i.e. one Customized Gate Control unit (Tang et al., RecSys 2020, Sec. 4.2-4.3).

    Each task has ``num_task_experts`` experts of its own and a softmax gate over [its own experts, the shared
    experts]; the ``num_shared_experts`` shared experts serve every task. With ``shared_gate`` (every level but the
    last) a further softmax gate over all experts [task 1's, ..., task T's, the shared ones] makes the input of the
    next level's shared experts. Each gate reads the same input as the experts of its branch.

    Args:
        in_features: width of every input of this level.
        task_names: one group of task experts and one gate per name.
        num_shared_experts: number of shared experts.
        num_task_experts: number of experts of each task.
        expert_layer_sizes: hidden sizes of each expert; the last is the level's output width.
        shared_gate: whether to build the gate over all experts that feeds the next level's shared experts.
    """

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        num_shared_experts: int,
        num_task_experts: int,
        expert_layer_sizes: Sequence[int],
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.out_features = expert_layer_sizes[-1]
        self.task_experts = nn.ModuleDict(
            {name: _experts(num_task_experts, in_features, expert_layer_sizes) for name in self.task_names}
        )
        self.shared_experts = _experts(num_shared_experts, in_features, expert_layer_sizes)
        self.task_gates = nn.ModuleDict(
            {name: nn.Linear(in_features, num_task_experts + num_shared_experts) for name in self.task_names}
        )
        num_all = len(self.task_names) * num_task_experts + num_shared_experts
        self.shared_gate: Optional[nn.Linear] = nn.Linear(in_features, num_all) if shared_gate else None

    def gate_weights(self, task_inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per-task softmax weights over [own experts, shared experts], [B, num_task + num_shared] each."""
        return {name: torch.softmax(gate(task_inputs[name]), dim=-1) for name, gate in self.task_gates.items()}

    def forward(
        self, task_inputs: Dict[str, torch.Tensor], shared_input: torch.Tensor
    ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """Per-task gated outputs [B, D] and, with a shared gate, the shared gated output [B, D] (else None)."""
        shared = [expert(shared_input) for expert in self.shared_experts]
        own = {name: [expert(task_inputs[name]) for expert in experts] for name, experts in self.task_experts.items()}
        task_outputs = {
            name: _mix(weights, torch.stack(own[name] + shared, dim=1))
            for name, weights in self.gate_weights(task_inputs).items()
        }
        if self.shared_gate is None:
            return task_outputs, None
        everything = torch.stack([out for name in self.task_names for out in own[name]] + shared, dim=1)
        return task_outputs, _mix(torch.softmax(self.shared_gate(shared_input), dim=-1), everything)


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang et al., RecSys 2020): stacked CGC levels, then one head per task.

    Level 1 reads the tower input in every branch. In every level but the last, each task's gated output feeds the
    next level's experts (and gate) of that task, and the shared gate's output feeds the next level's shared experts
    (and the next shared gate); levels after the first therefore read ``expert_layer_sizes[-1]`` features. The last
    level's per-task outputs go to the task heads. ``num_levels=1`` is CGC (see ``CGC``).

    Experts are separate MLPs, each with its own random initialisation, so they start different.

    Args:
        in_features: width of the input.
        task_names: one group of experts, one gate per level and one head per name.
        num_levels: number of extraction levels.
        num_shared_experts: number of shared experts in each level.
        num_task_experts: number of experts of each task in each level.
        expert_layer_sizes: hidden sizes of each expert; the last is the expert output width.
        tower_layer_sizes: hidden sizes of each task's head before its output unit.
    """

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        num_levels: int = 1,
        num_shared_experts: int = 2,
        num_task_experts: int = 2,
        expert_layer_sizes: Sequence[int] = (128, 64),
        tower_layer_sizes: Sequence[int] = (32,),
    ) -> None:
        super().__init__()
        self.task_names = _task_list(task_names)
        _check_at_least_one("in_features", in_features)
        _check_at_least_one("num_levels", num_levels)
        _check_at_least_one("num_shared_experts", num_shared_experts)
        _check_at_least_one("num_task_experts", num_task_experts)
        expert_layer_sizes = _layer_sizes("expert_layer_sizes", expert_layer_sizes)
        tower_layer_sizes = _layer_sizes("tower_layer_sizes", tower_layer_sizes, allow_empty=True)
        self.levels = nn.ModuleList(
            [
                ExtractionLevel(
                    in_features if level == 0 else expert_layer_sizes[-1],
                    self.task_names,
                    num_shared_experts,
                    num_task_experts,
                    expert_layer_sizes,
                    shared_gate=level < num_levels - 1,
                )
                for level in range(num_levels)
            ]
        )
        self.heads = TaskHeads(expert_layer_sizes[-1], self.task_names, tower_layer_sizes)

    def shared_parameters(self) -> List[nn.Parameter]:
        """Parameters every task's output depends on: the shared experts of every level."""
        return [p for level in self.levels for p in level.shared_experts.parameters()]

    def _last_level_inputs(self, features: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """The per-task and shared inputs of the last level: the tower input, passed through the levels before it."""
        task_inputs = {name: features for name in self.task_names}
        shared_input = features
        for level in self.levels[:-1]:
            task_inputs, shared_input = level(task_inputs, shared_input)
        return task_inputs, shared_input

    def gate_weights(self, features: TowerInput) -> Dict[str, torch.Tensor]:
        """The last level's per-task softmax weights over [own experts, shared experts]; every row sums to 1.

        ``[B, num_task_experts + num_shared_experts]`` each, the task's own experts first, as in ``MMoE.gate_weights``.
        """
        features = _as_tensor(features)
        task_inputs, _ = self._last_level_inputs(features)
        return self.levels[-1].gate_weights(task_inputs)

    def forward(self, features: TowerInput) -> Dict[str, torch.Tensor]:
        features = _as_tensor(features)
        task_inputs, shared_input = self._last_level_inputs(features)
        task_outputs, _ = self.levels[-1](task_inputs, shared_input)
        return self.heads(task_outputs)


class CGC(PLE):
    """Customized Gate Control (Tang et al., RecSys 2020, Sec. 4.2): PLE with a single extraction level."""

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        num_shared_experts: int = 2,
        num_task_experts: int = 2,
        expert_layer_sizes: Sequence[int] = (128, 64),
        tower_layer_sizes: Sequence[int] = (32,),
    ) -> None:
        super().__init__(
            in_features,
            task_names,
            num_levels=1,
            num_shared_experts=num_shared_experts,
            num_task_experts=num_task_experts,
            expert_layer_sizes=expert_layer_sizes,
            tower_layer_sizes=tower_layer_sizes,
        )


TOWERS: Dict[str, Type[nn.Module]] = {
    "single_task": SingleTask,
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "ple": PLE,
}
