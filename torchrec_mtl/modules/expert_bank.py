"""Experts of the same layer sizes as one batched computation: ``ExpertBank``.

MMoE's experts, and each of PLE's groups of experts in a level, are MLPs of the same sizes. Run one after another,
each layer is one small matrix product per expert. Held as one stacked weight per layer, the experts' first layers
are one product (they read the same input, and their weights side by side are one [E * out, in] matrix) and each
later layer is one batched product (``torch.baddbmm``) over the experts.

Example::

    >>> bank = ExpertBank(4, in_features=8, layer_sizes=[16, 4])
    >>> [tuple(weight.shape) for weight in bank.weights]  # [experts, out, in]: each expert's slice is an nn.Linear's
    [(4, 16, 8), (4, 4, 16)]
    >>> bank(torch.randn(5, 8)).shape  # [experts, rows, out]
    torch.Size([4, 5, 4])
    >>> sorted(bank.old_layout())[:2]  # the per-expert keys it replaced: state dicts of that layout load
    ['0._mlp.0._linear.bias', '0._mlp.0._linear.weight']
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

# The key of an expert's layer in the per-expert layout: a torchrec MLP per expert (``<name>`` its place in the
# ModuleList, or ``<task>.<i>`` for PLE's task experts), a Perceptron per layer with its ``_linear``.
OLD_KEY = "{name}._mlp.{layer}._linear.{kind}"


class ExpertBank(nn.Module):
    """``num_experts`` MLPs with the same ``layer_sizes`` (ReLU after every layer, the last included, as torchrec's
    MLP), computed together.

    Layer ``l`` of every expert is one parameter ``weights[l]`` [E, out, in] and ``biases[l]`` [E, out]: expert
    ``e``'s slice is its own nn.Linear's weight and bias, in nn.Linear's layout, so the first layers of all experts
    are one [E * out, in] matrix without a copy, and a state dict of the per-expert layout stacks into them as it is.

    Each expert is initialised as its own nn.Linear layers would be, drawn in the order the separate MLPs drew them
    (expert by expert, layer by layer, weight then bias): a seeded build holds the very numbers the per-expert
    layout held, so experts start different and training starts where it did.

    Args:
        num_experts: number of experts (E).
        in_features: width of the input.
        layer_sizes: each expert's hidden sizes; the last is its output width.
        old_names: each expert's name in the per-expert layout (``"0"``, ``"1"``, ... by default; PLE's task
            experts were ``"<task>.<i>"``), for loading state dicts of that layout (``old_layout``).
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        layer_sizes: Sequence[int],
        old_names: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.layer_sizes = num_experts, in_features, list(layer_sizes)
        self.old_names = [str(e) for e in range(num_experts)] if old_names is None else list(old_names)
        if len(self.old_names) != num_experts:
            raise ValueError(f"old_names: one per expert ({num_experts}), got {len(self.old_names)}")
        inputs = [in_features, *self.layer_sizes[:-1]]
        experts = [[nn.Linear(i, o) for i, o in zip(inputs, self.layer_sizes)] for _ in range(num_experts)]
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.stack([layers[i].weight.detach() for layers in experts])) for i in range(len(inputs))]
        )
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.stack([layers[i].bias.detach() for layers in experts])) for i in range(len(inputs))]
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Every expert's output for one input they all read: ``features`` [B, in] -> [E, B, out]."""
        hidden, _ = self.first_layer(features)
        return self.later_layers(hidden)

    def forward_grouped(self, features: torch.Tensor) -> torch.Tensor:
        """Every expert's output when each group of E / G consecutive experts reads its own input (PLE's levels
        after the first: each task's experts read that task's input): ``features`` [G, B, in] -> [E, B, out]."""
        groups, per_group, width = features.shape[0], self.num_experts // features.shape[0], self.layer_sizes[0]
        weight = self.weights[0].reshape(groups, per_group * width, self.in_features)
        bias = self.biases[0].reshape(groups, 1, per_group * width)
        hidden = torch.relu(torch.baddbmm(bias, features, weight.transpose(1, 2)))  # [G, B, per_group * width]
        hidden = hidden.unflatten(2, (per_group, width)).transpose(1, 2).reshape(self.num_experts, -1, width)
        return self.later_layers(hidden)

    def first_layer(
        self,
        features: torch.Tensor,
        extra_weight: Optional[torch.Tensor] = None,
        extra_bias: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Every expert's first layer in one product: ``features`` [B, in] -> [E, B, out] after the activation.

        With ``extra_weight`` [k, in] and ``extra_bias`` [k] (MMoE's gates), their rows join the same product and
        their outputs come back too, [B, k], as they are (no activation); otherwise None.
        """
        width = self.layer_sizes[0]
        weight = self.weights[0].reshape(self.num_experts * width, self.in_features)  # a view: no copy
        bias = self.biases[0].reshape(self.num_experts * width)
        if extra_weight is not None and extra_bias is not None:
            weight, bias = torch.cat([weight, extra_weight]), torch.cat([bias, extra_bias])
        # linear, not addmm: TorchScript (the export) decomposes addmm into mm + add, which rounds otherwise; linear
        # runs the same kernel in both, so the exported model scores bit for bit as this one does
        out = nn.functional.linear(features, weight, bias)
        extra = None
        if extra_weight is not None:
            # split, not two slices: a slice's gradient is a zero-filled copy of the whole product's, split's one cat
            parts = out.split([self.num_experts * width, out.shape[1] - self.num_experts * width], dim=1)
            out, extra = parts[0], parts[1]
        # [B, E, out] -> [E, B, out] as a strided view: the batched products below take it without a copy
        return torch.relu(out).unflatten(1, (self.num_experts, width)).transpose(0, 1), extra

    def later_layers(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layers after the first: [E, B, in] -> [E, B, out], each one batched product over the experts."""
        for weight, bias in zip(list(self.weights)[1:], list(self.biases)[1:]):
            hidden = torch.relu(torch.baddbmm(bias.unsqueeze(1), hidden, weight.transpose(1, 2)))
        return hidden

    def expert_weights(self) -> Iterator[torch.Tensor]:
        """Each expert's weight of each layer, [out, in] each: views of ``weights`` (what one nn.Linear held)."""
        for weight in self.weights:
            yield from weight.detach().unbind(0)

    def old_layout(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """This bank's tensors under the keys of the per-expert layout it replaced
        (``<prefix><name>._mlp.<layer>._linear.weight`` and ``.bias``), as views of its own: values loaded into
        them are loaded into the bank (how a DCP checkpoint of that layout loads, torchrec_mtl.train.checkpoint)."""
        views: Dict[str, torch.Tensor] = {}
        for e, name in enumerate(self.old_names):
            for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
                views[prefix + OLD_KEY.format(name=name, layer=layer, kind="weight")] = weight.detach()[e]
                views[prefix + OLD_KEY.format(name=name, layer=layer, kind="bias")] = bias.detach()[e]
        return views

    def _load_from_state_dict(
        self,
        state_dict: Dict[str, torch.Tensor],
        prefix: str,
        local_metadata: Dict,
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        # A state dict of the per-expert layout: its tensors stacked under this bank's keys, expert by expert, before
        # the ordinary load (load_state_dict calls this before it loads the children, ``weights`` and ``biases``).
        old = [key for key in self.old_layout(prefix) if key in state_dict]
        if old and f"{prefix}weights.0" not in state_dict:
            if len(old) < 2 * self.num_experts * len(self.layer_sizes):
                error_msgs.append(f"{prefix[:-1]}: a state dict of the per-expert layout lacks some experts' layers "
                                  f"(has {len(old)} of {2 * self.num_experts * len(self.layer_sizes)} tensors)")
            else:
                for layer in range(len(self.layer_sizes)):
                    for kind, stacked in (("weight", "weights"), ("bias", "biases")):
                        keys = [prefix + OLD_KEY.format(name=n, layer=layer, kind=kind) for n in self.old_names]
                        state_dict[f"{prefix}{stacked}.{layer}"] = torch.stack([state_dict.pop(k) for k in keys])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
