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

from typing import TYPE_CHECKING, Dict, List, Sequence, Type

import torch
from torch import nn
from torchrec.modules.mlp import MLP

from torchrec_mtl.modules.ple import CGC, PLE  # noqa: F401 (CGC: importable from here, as before)
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

    @classmethod
    def from_config(cls, config: "TowerConfig", in_features: int, task_names: Sequence[str]) -> "SingleTask":
        """The tower a config's ``model.tower`` section describes (``build_tower`` calls it through ``TOWERS``)."""
        return cls(in_features, task_names, config.expert_layer_sizes, config.tower_layer_sizes)

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        expert_layer_sizes: Sequence[int] = (128, 64),
        tower_layer_sizes: Sequence[int] = (32,),
    ) -> None:
        super().__init__()
        self.task_names = task_list(task_names)
        check_at_least_one("in_features", in_features)
        expert_layer_sizes = layer_sizes_of("expert_layer_sizes", expert_layer_sizes)
        tower_layer_sizes = layer_sizes_of("tower_layer_sizes", tower_layer_sizes, allow_empty=True)
        self.bottoms = nn.ModuleDict({name: MLP(in_features, expert_layer_sizes) for name in self.task_names})
        self.heads = TaskHeads(expert_layer_sizes[-1], self.task_names, tower_layer_sizes)

    def forward(self, features: TowerInput) -> Dict[str, torch.Tensor]:
        features = as_tensor(features)
        return self.heads({name: bottom(features) for name, bottom in self.bottoms.items()})

    def shared_parameters(self) -> List[nn.Parameter]:
        """Parameters every task's output depends on: none here."""
        return []


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018): shared experts, one softmax gate per task.

    The experts are one ``ExpertBank`` (one batched computation; each expert initialised as its own MLP, so they
    start different), and the gates' logits come out of the same matrix product as the experts' first layers, which
    read the same input (the attribute ``fuse_gates``, True; False computes each gate on its own, the same function:
    tools/bench_towers.py times both). A state dict of the per-expert layout (``experts.<e>._mlp.<l>._linear.*``)
    loads.

    Args:
        in_features: width of the input.
        task_names: one gate and one head per name.
        num_experts: number of shared experts.
        expert_layer_sizes: hidden sizes of each expert; the last is the expert output width.
        tower_layer_sizes: hidden sizes of each task's head before its output unit.
        gate_temperature: divides the gates' logits (above 1: flatter weights).
        expert_dropout: in training, the probability of leaving an expert out of a row's mix (``Gate``).
    """

    @classmethod
    def from_config(cls, config: "TowerConfig", in_features: int, task_names: Sequence[str]) -> "MMoE":
        """The tower a config's ``model.tower`` section describes (``build_tower`` calls it through ``TOWERS``)."""
        return cls(
            in_features, task_names, config.num_experts, config.expert_layer_sizes, config.tower_layer_sizes,
            gate_temperature=config.gate_temperature, expert_dropout=config.expert_dropout,
        )  # fmt: skip

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        num_experts: int = 4,
        expert_layer_sizes: Sequence[int] = (128, 64),
        tower_layer_sizes: Sequence[int] = (32,),
        gate_temperature: float = 1.0,
        expert_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.task_names = task_list(task_names)
        check_at_least_one("in_features", in_features)
        check_at_least_one("num_experts", num_experts)
        expert_layer_sizes = layer_sizes_of("expert_layer_sizes", expert_layer_sizes)
        tower_layer_sizes = layer_sizes_of("tower_layer_sizes", tower_layer_sizes, allow_empty=True)
        self.experts = ExpertBank(num_experts, in_features, expert_layer_sizes)
        self.gates = nn.ModuleDict(
            {name: Gate(in_features, num_experts, gate_temperature, expert_dropout) for name in self.task_names}
        )
        self.heads = TaskHeads(expert_layer_sizes[-1], self.task_names, tower_layer_sizes)
        self.fuse_gates = True

    def shared_parameters(self) -> List[nn.Parameter]:
        """Parameters every task's output depends on: the experts."""
        return list(self.experts.parameters())

    def task_gates(self) -> Dict[str, Gate]:
        """Each task's gate: its output is the task's ``gate_weights`` (protocols.ExposesTaskGates)."""
        return dict(self.gates)

    def gate_weights(self, features: TowerInput, drop_experts: bool = False) -> Dict[str, torch.Tensor]:
        """Per-task softmax weights over the experts, [B, num_experts] each; every row sums to 1. ``drop_experts``:
        with the gates' expert dropout (training's forward asks for it; the diagnostics see the weights without)."""
        features = as_tensor(features)
        return {name: gate(features, drop_experts) for name, gate in self.gates.items()}

    def forward(self, features: TowerInput) -> Dict[str, torch.Tensor]:
        features = as_tensor(features)
        gates = list(self.gates.values())
        if self.fuse_gates:
            # the gates read the experts' input: their rows join the experts' first-layer product
            hidden, logits = self.experts.first_layer(
                features, torch.cat([gate.weight for gate in gates]), torch.cat([gate.bias for gate in gates])
            )
            expert_outputs = self.experts.later_layers(hidden)
            parts = logits.split(self.experts.num_experts, dim=1)  # indexed below: FX (the export) cannot iterate it
            weights = [gate.weigh(parts[t], self.training) for t, gate in enumerate(gates)]
        else:
            expert_outputs = self.experts(features)
            weights = [gate(features, self.training) for gate in gates]
        return self.heads(dict(zip(self.task_names, mix(weights, expert_outputs))))


class SharedBottom(nn.Module):
    """One shared MLP, then one head per task (Caruana 1997)."""

    @classmethod
    def from_config(cls, config: "TowerConfig", in_features: int, task_names: Sequence[str]) -> "SharedBottom":
        """The tower a config's ``model.tower`` section describes: its ``expert_layer_sizes`` size the one shared
        bottom."""
        return cls(in_features, task_names, config.expert_layer_sizes, config.tower_layer_sizes)

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        bottom_layer_sizes: Sequence[int] = (128, 64),
        tower_layer_sizes: Sequence[int] = (32,),
    ) -> None:
        super().__init__()
        self.task_names = task_list(task_names)
        check_at_least_one("in_features", in_features)
        bottom_layer_sizes = layer_sizes_of("bottom_layer_sizes", bottom_layer_sizes)
        tower_layer_sizes = layer_sizes_of("tower_layer_sizes", tower_layer_sizes, allow_empty=True)
        self.bottom = MLP(in_features, bottom_layer_sizes)
        self.heads = TaskHeads(bottom_layer_sizes[-1], self.task_names, tower_layer_sizes)

    def shared_parameters(self) -> List[nn.Parameter]:
        """Parameters every task's output depends on: the bottom."""
        return list(self.bottom.parameters())

    def forward(self, features: TowerInput) -> Dict[str, torch.Tensor]:
        features = as_tensor(features)
        shared = self.bottom(features)
        return self.heads({name: shared for name in self.task_names})


# The one registry of tower kinds: ``model.tower.kind`` names a key, and ``build_tower`` calls the class's
# ``from_config(config.model.tower, in_features, task_names)``. A new kind is a class with that classmethod plus its
# line here (or ``TOWERS["my_kind"] = MyTower`` from your own code, before the config is loaded).
TOWERS: Dict[str, Type[nn.Module]] = {
    "single_task": SingleTask,
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "ple": PLE,
}

__all__ = ["CGC", "MMoE", "PLE", "SharedBottom", "SingleTask", "TOWERS", "TaskHeads", "TowerInput"]
