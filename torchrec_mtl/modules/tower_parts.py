"""What the towers share: the input type, argument checks, the expert bank, the gates, the gated mix and the
per-task heads.

Example::

    >>> heads = TaskHeads(8, ["ctr", "cvr"], layer_sizes=[4])
    >>> sorted(heads({"ctr": torch.randn(2, 8), "cvr": torch.randn(2, 8)}))
    ['ctr', 'cvr']
    >>> ExpertBank(3, 8, [16, 4])(torch.randn(5, 8)).shape  # [experts, rows, the last layer size]
    torch.Size([3, 5, 4])
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch
from torch import nn
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_mtl.modules.expert_bank import ExpertBank  # noqa: F401 (the towers' experts; importable from here)

# A tower's input: a dense [B, in_features] tensor, or a KeyedTensor (e.g. an EmbeddingBagCollection's output) whose
# values() are that tensor.
TowerInput = Union[torch.Tensor, KeyedTensor]


def task_list(task_names: Sequence[str]) -> List[str]:
    """``task_names`` as a list, refusing a bare string, an empty list and repeated names."""
    if isinstance(task_names, str):
        raise TypeError(f"task_names: expected a list of names, got the string {task_names!r}")
    names = list(task_names)
    if not names:
        raise ValueError("task_names: must name at least one task, got an empty list")
    if len(set(names)) != len(names):
        raise ValueError(f"task_names: names must be unique, got {names}")
    return names


def check_at_least_one(argument: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{argument}: must be at least 1, got {value}")


def layer_sizes_of(argument: str, sizes: Sequence[int], allow_empty: bool = False) -> List[int]:
    sizes = list(sizes)
    if not sizes and not allow_empty:
        raise ValueError(f"{argument}: needs at least one layer size, got {sizes}")
    if any(size < 1 for size in sizes):
        raise ValueError(f"{argument}: every layer size must be at least 1, got {sizes}")
    return sizes


class GateWeights(nn.Module):
    """A gate's weights from its logits: ``softmax(logits / temperature)``, with expert dropout when asked. A module
    of its own so that one forward hook sees every gate's weights, whether the logits came from the gate's own Linear
    or from MMoE's product fused with its experts' first layers (the diagnostics' GateMonitor hooks it).

    Example::

        >>> GateWeights(temperature=2.0)(torch.tensor([[0.0, 2.0]]))
        tensor([[0.2689, 0.7311]])
    """

    def __init__(self, temperature: float = 1.0, expert_dropout: float = 0.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature: must be positive, got {temperature}")
        if not 0 <= expert_dropout < 1:
            raise ValueError(f"expert_dropout: allowed 0 <= expert_dropout < 1, got {expert_dropout}")
        self.temperature, self.expert_dropout = float(temperature), float(expert_dropout)

    def forward(self, logits: torch.Tensor, drop_experts: bool = False) -> torch.Tensor:
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if drop_experts and self.expert_dropout > 0:
            dropped = torch.rand_like(logits) < self.expert_dropout
            dropped = dropped & ~dropped.all(dim=-1, keepdim=True)  # a row that would lose every expert keeps them all
            logits = logits.masked_fill(dropped, float("-inf"))
        return torch.softmax(logits, dim=-1)


class Gate(nn.Linear):
    """A softmax gate over experts: ``softmax(linear(x) / temperature)``, one row of weights per input row, each
    summing to 1. A Linear itself, so its parameters keep the names a plain Linear gate had (``gates.<task>.weight``);
    the softmax is its child ``weighing`` (``GateWeights``, no parameters).

    Two remedies against a gate that settles on one expert and leaves others unused (collapse): a ``temperature``
    above 1 flattens the weights; ``expert_dropout`` (in training, when the caller asks) leaves each expert out of a
    row's mix with that probability, never all of them, so a task cannot rest on one expert alone. At 1 and 0 the
    gate is the plain softmax of a Linear, bit for bit.

    Example::

        >>> gate = Gate(8, 4, temperature=2.0, expert_dropout=0.25)
        >>> gate(torch.randn(5, 8), drop_experts=True).sum(dim=-1)
        tensor([1.0000, 1.0000, 1.0000, 1.0000, 1.0000], grad_fn=<SumBackward1>)
    """

    def __init__(self, in_features: int, num_experts: int, temperature: float = 1.0, expert_dropout: float = 0.0):
        super().__init__(in_features, num_experts)
        self.weighing = GateWeights(temperature, expert_dropout)

    @property
    def temperature(self) -> float:
        return self.weighing.temperature

    @property
    def expert_dropout(self) -> float:
        return self.weighing.expert_dropout

    def forward(self, features: torch.Tensor, drop_experts: bool = False) -> torch.Tensor:
        return self.weighing(super().forward(features), drop_experts)

    def weigh(self, logits: torch.Tensor, drop_experts: bool = False) -> torch.Tensor:
        """The gate's weights from its logits ``linear(features)`` computed elsewhere (MMoE computes them in one
        product with its experts' first layers)."""
        return self.weighing(logits, drop_experts)


def as_tensor(features: TowerInput) -> torch.Tensor:
    return features.values() if isinstance(features, KeyedTensor) else features


def mix(weights: Sequence[torch.Tensor], expert_outputs: torch.Tensor) -> List[torch.Tensor]:
    """Gate-weighted sums of expert outputs, one per gate: weights [B, E] each and outputs [E, B, D] (as
    ``ExpertBank`` gives them) give [B, D] each.

    All gates in one batched product ([B, gates, E] @ [B, E, D]): one product of [1, E] rows per gate was several
    times slower on the CPU.
    """
    mixed = torch.bmm(torch.stack(list(weights), dim=1), expert_outputs.transpose(0, 1))  # [B, gates, D]
    parts = mixed.unbind(dim=1)  # (indexed, not iterated: FX, which the export traces with, cannot iterate it)
    return [parts[g] for g in range(len(weights))]


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
