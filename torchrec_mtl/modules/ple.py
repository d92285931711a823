"""Progressive Layered Extraction (Tang et al., RecSys 2020): task-specific and shared experts, gated level by level;
CGC is PLE with a single level.

Example::

    >>> ple = PLE(64, ["ctr", "cvr"], num_levels=2, num_shared_experts=1, num_task_experts=2, expert_layer_sizes=[16])
    >>> {name: weights.shape for name, weights in ple.gate_weights(torch.randn(8, 64)).items()}
    {'ctr': torch.Size([8, 3]), 'cvr': torch.Size([8, 3])}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from torchrec_mtl.modules.tower_parts import (
    ExpertBank,
    Gate,
    TaskHeads,
    TowerInput,
    as_tensor,
    check_at_least_one,
    layer_sizes_of,
    mix,
    task_list,
)

if TYPE_CHECKING:
    from torchrec_mtl.config import TowerConfig


class ExtractionLevel(nn.Module):
    """One extraction level of PLE, i.e. one Customized Gate Control unit (Tang et al., RecSys 2020, Sec. 4.2-4.3).

    Each task has ``num_task_experts`` experts of its own and a softmax gate over [its own experts, the shared
    experts]; the ``num_shared_experts`` shared experts serve every task. With ``shared_gate`` (every level but the
    last) a further softmax gate over all experts [task 1's, ..., task T's, the shared ones] makes the input of the
    next level's shared experts. Each gate reads the same input as the experts of its branch.

    The task experts of all tasks are one ``ExpertBank`` (in the first level they read the same input: one product
    per layer; after it each task's group reads its own input: one batched product), the shared experts another
    (``shared_parameters`` must tell them apart). The gates stay separate Linears.

    Args:
        in_features: width of every input of this level.
        task_names: one group of task experts and one gate per name.
        num_shared_experts: number of shared experts.
        num_task_experts: number of experts of each task.
        expert_layer_sizes: hidden sizes of each expert; the last is the level's output width.
        shared_gate: whether to build the gate over all experts that feeds the next level's shared experts.
        gate_temperature, expert_dropout: every gate's (``Gate``).
    """

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        num_shared_experts: int,
        num_task_experts: int,
        expert_layer_sizes: Sequence[int],
        shared_gate: bool,
        gate_temperature: float = 1.0,
        expert_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.out_features = expert_layer_sizes[-1]
        self.num_task_experts = num_task_experts
        # task by task, as the per-expert layout held them (``task_experts.<task>.<i>``: those state dicts load)
        old_names = [f"{name}.{i}" for name in self.task_names for i in range(num_task_experts)]
        self.task_experts = ExpertBank(len(old_names), in_features, expert_layer_sizes, old_names)
        self.shared_experts = ExpertBank(num_shared_experts, in_features, expert_layer_sizes)
        gate = lambda count: Gate(in_features, count, gate_temperature, expert_dropout)  # noqa: E731
        self.task_gates = nn.ModuleDict({name: gate(num_task_experts + num_shared_experts) for name in self.task_names})
        num_all = len(self.task_names) * num_task_experts + num_shared_experts
        self.shared_gate: Optional[Gate] = gate(num_all) if shared_gate else None

    def gate_weights(self, task_inputs: Dict[str, torch.Tensor], drop_experts: bool = False) -> Dict[str, torch.Tensor]:
        """Per-task softmax weights over [own experts, shared experts], [B, num_task + num_shared] each
        (``drop_experts``: with the gates' expert dropout)."""
        return {name: gate(task_inputs[name], drop_experts) for name, gate in self.task_gates.items()}

    def forward(
        self, task_inputs: Dict[str, torch.Tensor], shared_input: torch.Tensor, drop_experts: bool = False
    ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """Per-task gated outputs [B, D] and, with a shared gate, the shared gated output [B, D] (else None);
        ``drop_experts``: with the gates' expert dropout."""
        shared = self.shared_experts(shared_input)  # [num_shared, B, D]
        inputs = [task_inputs[name] for name in self.task_names]
        if all(task_input is inputs[0] for task_input in inputs):  # the first level: every task reads the tower input
            own = self.task_experts(inputs[0])  # [T * num_task, B, D], task by task
        else:
            own = self.task_experts.forward_grouped(torch.stack(inputs))
        count = self.num_task_experts
        task_outputs = {
            name: mix([weights], torch.cat([own[t * count : (t + 1) * count], shared]))[0]
            for t, (name, weights) in enumerate(self.gate_weights(task_inputs, drop_experts).items())
        }
        if self.shared_gate is None:
            return task_outputs, None
        return task_outputs, mix([self.shared_gate(shared_input, drop_experts)], torch.cat([own, shared]))[0]


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang et al., RecSys 2020): stacked CGC levels, then one head per task.

    Level 1 reads the tower input in every branch. In every level but the last, each task's gated output feeds the
    next level's experts (and gate) of that task, and the shared gate's output feeds the next level's shared experts
    (and the next shared gate); levels after the first therefore read ``expert_layer_sizes[-1]`` features. The last
    level's per-task outputs go to the task heads. ``num_levels=1`` is CGC (see ``CGC``).

    Each level's experts are two ``ExpertBank``s, its task experts' and its shared experts' (one batched
    computation each; each expert initialised as its own MLP, so they start different). State dicts of the
    per-expert layout (``levels.<k>.task_experts.<task>.<i>._mlp...``, ``levels.<k>.shared_experts.<i>._mlp...``)
    load.

    Args:
        in_features: width of the input.
        task_names: one group of experts, one gate per level and one head per name.
        num_levels: number of extraction levels.
        num_shared_experts: number of shared experts in each level.
        num_task_experts: number of experts of each task in each level.
        expert_layer_sizes: hidden sizes of each expert; the last is the expert output width.
        tower_layer_sizes: hidden sizes of each task's head before its output unit.
        gate_temperature, expert_dropout: every gate's (``Gate``).
    """

    @classmethod
    def from_config(cls, config: "TowerConfig", in_features: int, task_names: Sequence[str]) -> "PLE":
        """The tower a config's ``model.tower`` section describes (``build_tower`` calls it through ``TOWERS``)."""
        return cls(
            in_features, task_names, num_levels=config.num_levels, num_shared_experts=config.num_shared_experts,
            num_task_experts=config.num_task_experts, expert_layer_sizes=config.expert_layer_sizes,
            tower_layer_sizes=config.tower_layer_sizes, gate_temperature=config.gate_temperature,
            expert_dropout=config.expert_dropout,
        )  # fmt: skip

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        num_levels: int = 1,
        num_shared_experts: int = 2,
        num_task_experts: int = 2,
        expert_layer_sizes: Sequence[int] = (128, 64),
        tower_layer_sizes: Sequence[int] = (32,),
        gate_temperature: float = 1.0,
        expert_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.task_names = task_list(task_names)
        check_at_least_one("in_features", in_features)
        check_at_least_one("num_levels", num_levels)
        check_at_least_one("num_shared_experts", num_shared_experts)
        check_at_least_one("num_task_experts", num_task_experts)
        expert_layer_sizes = layer_sizes_of("expert_layer_sizes", expert_layer_sizes)
        tower_layer_sizes = layer_sizes_of("tower_layer_sizes", tower_layer_sizes, allow_empty=True)
        self.levels = nn.ModuleList(
            [
                ExtractionLevel(
                    in_features if level == 0 else expert_layer_sizes[-1],
                    self.task_names,
                    num_shared_experts,
                    num_task_experts,
                    expert_layer_sizes,
                    shared_gate=level < num_levels - 1,
                    gate_temperature=gate_temperature,
                    expert_dropout=expert_dropout,
                )
                for level in range(num_levels)
            ]
        )
        self.heads = TaskHeads(expert_layer_sizes[-1], self.task_names, tower_layer_sizes)

    def shared_parameters(self) -> List[nn.Parameter]:
        """Parameters every task's output depends on: the shared experts of every level."""
        return [p for level in self.levels for p in level.shared_experts.parameters()]

    def _last_level_inputs(
        self, features: torch.Tensor, drop_experts: bool = False
    ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """The per-task and shared inputs of the last level: the tower input, passed through the levels before it."""
        task_inputs = {name: features for name in self.task_names}
        shared_input = features
        for level in self.levels[:-1]:
            task_inputs, shared_input = level(task_inputs, shared_input, drop_experts)
        return task_inputs, shared_input

    def task_gates(self) -> Dict[str, Gate]:
        """The last level's gate of each task: its output is the task's ``gate_weights`` (protocols.ExposesTaskGates);
        watching them costs nothing, where ``gate_weights`` runs every level below the last again."""
        return dict(self.levels[-1].task_gates)

    def gate_weights(self, features: TowerInput) -> Dict[str, torch.Tensor]:
        """The last level's per-task softmax weights over [own experts, shared experts]; every row sums to 1.

        ``[B, num_task_experts + num_shared_experts]`` each, the task's own experts first, as in ``MMoE.gate_weights``.
        """
        features = as_tensor(features)
        task_inputs, _ = self._last_level_inputs(features)
        return self.levels[-1].gate_weights(task_inputs)

    def forward(self, features: TowerInput) -> Dict[str, torch.Tensor]:
        features = as_tensor(features)
        task_inputs, shared_input = self._last_level_inputs(features, drop_experts=self.training)
        task_outputs, _ = self.levels[-1](task_inputs, shared_input, self.training)
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
