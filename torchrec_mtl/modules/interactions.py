"""What sits between the embeddings and the tower: how the dense arch's output and the pooled embeddings become the
tower's input.

Each interaction maps ``(dense [B, D], embeddings [B, F, D])`` to ``[B, out_features]``; ``INTERACTIONS`` maps
``model.interaction.kind`` to its class, built by ``from_config(config, num_embeddings, embedding_dim,
dense_width)``. ``concat`` and ``dcn`` also take the dense features raw (``model.dense_arch_layer_sizes: []``,
``dense_width`` = their number), as the peers' models do; ``dot`` needs them projected to D:

- ``dot``: DLRM's pairwise dot products (torchrec's ``InteractionArch``) beside the raw inputs: ``D (F + 1) +
  (F + 1) F / 2`` features (the default, as before this choice existed);
- ``concat``: the raw inputs alone, ``dense_width + D F`` features (the peers' way, and the cheapest);
- ``dcn``: DCN-V2's low-rank cross network (torchrec's ``LowRankCrossNet``, Wang et al., WWW 2021) over the
  concatenated inputs, ``dense_width + D F`` features.

Example::

    >>> dot = DotInteraction(num_embeddings=3, embedding_dim=4)
    >>> dot(torch.randn(2, 4), torch.randn(2, 3, 4)).shape, dot.out_features
    (torch.Size([2, 22]), 22)
    >>> CrossInteraction(3, 4, num_layers=2, low_rank=2)(torch.randn(2, 4), torch.randn(2, 3, 4)).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Type

import torch
from torch import nn
from torchrec.models.dlrm import InteractionArch, choose
from torchrec.modules.crossnet import LowRankCrossNet

if TYPE_CHECKING:
    from torchrec_mtl.config import InteractionConfig


class DotInteraction(nn.Module):
    """DLRM's interaction: the dense output, every pairwise dot product of the F + 1 vectors, and the raw embeddings."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.arch = InteractionArch(num_embeddings)
        self.out_features = embedding_dim * (1 + num_embeddings) + choose(num_embeddings + 1, 2)

    @classmethod
    def from_config(
        cls, config: "InteractionConfig", num_embeddings: int, embedding_dim: int, dense_width: int
    ) -> "DotInteraction":
        if dense_width != embedding_dim:
            raise ValueError(f"dot interaction: the dense output is {dense_width} wide; it needs the embedding dim "
                             f"({embedding_dim}): model.dense_arch_layer_sizes must end at it")  # fmt: skip
        return cls(num_embeddings, embedding_dim)

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        # InteractionArch returns [dense, pairwise dots]; the raw embeddings are added so the tower sees both
        return torch.cat([self.arch(dense, embeddings), embeddings.flatten(1)], dim=1)


def side_by_side_width(num_embeddings: int, embedding_dim: int, dense_width: Optional[int] = None) -> int:
    """The width of the dense output (``dense_width``; None: the embedding dim) and the flattened embeddings."""
    return (embedding_dim if dense_width is None else dense_width) + embedding_dim * num_embeddings


class ConcatInteraction(nn.Module):
    """No interaction layer: the dense output (``dense_width`` wide; None: the embedding dim) and the embeddings
    side by side."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dense_width: Optional[int] = None) -> None:
        super().__init__()
        self.out_features = side_by_side_width(num_embeddings, embedding_dim, dense_width)

    @classmethod
    def from_config(
        cls, config: "InteractionConfig", num_embeddings: int, embedding_dim: int, dense_width: int
    ) -> "ConcatInteraction":
        return cls(num_embeddings, embedding_dim, dense_width)

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.cat([dense, embeddings.flatten(1)], dim=1)


class CrossInteraction(nn.Module):
    """DCN-V2: ``num_layers`` low-rank cross layers (rank ``low_rank``) over the concatenated inputs, each layer
    ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` with ``W_l = U_l V_l``."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        num_layers: int = 2,
        low_rank: int = 16,
        dense_width: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.out_features = side_by_side_width(num_embeddings, embedding_dim, dense_width)
        self.cross = LowRankCrossNet(self.out_features, num_layers, low_rank)

    @classmethod
    def from_config(
        cls, config: "InteractionConfig", num_embeddings: int, embedding_dim: int, dense_width: int
    ) -> "CrossInteraction":
        return cls(num_embeddings, embedding_dim, config.num_layers, config.low_rank, dense_width)

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.cross(torch.cat([dense, embeddings.flatten(1)], dim=1))


# the interactions that take the dense features raw (``model.dense_arch_layer_sizes: []``)
RAW_DENSE_INTERACTIONS = ("concat", "dcn")
# The one registry of interactions: ``model.interaction.kind`` names a key.
INTERACTIONS: Dict[str, Type[nn.Module]] = {
    "dot": DotInteraction,
    "concat": ConcatInteraction,
    "dcn": CrossInteraction,
}
