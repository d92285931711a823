"""Attention over a history against the candidate: DIN's activation unit and BST's transformer, and what puts them
in a TorchRec model.

Both modules map ``(query [B, D], history [B, L, D], lengths [B])`` to one interest vector ``[B, D]`` per row:
``query`` is the candidate (the item being scored, or several of its columns side by side), ``history`` the
user's past items padded to ``L`` positions (row ``b`` holds ``lengths[b]`` of them, the rest is padding, whatever it
holds), each position the same columns side by side. Padded positions never reach the output, and an empty history
gives a defined, finite output.

- ``DINAttention`` (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018): an MLP
  scores each position from ``[q, k, q - k, q * k]``; the interest is the score-weighted sum of the positions.
- ``BSTEncoder`` (Chen et al., "Behavior Sequence Transformer for E-commerce Recommendation in Alibaba", 2019): a
  ``torch.nn.TransformerEncoder`` over the history followed by the target, with learned position embeddings;
  the interest is the target position's output.

They take dense tensors, so they fit any model; with torchrec, an ``EmbeddingCollection``'s output for a list
feature is a ``JaggedTensor`` whose ``to_padded_dense(L)`` is ``history`` and whose ``lengths()`` is ``lengths``.
``SequenceLookups`` does that for the multi-task model (torchrec_mtl.model), and ``InterestArch`` runs the
configured module (``model.sequence``) and brings its output to the embedding width.

Example::

    >>> import torch
    >>> from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    >>> ec = EmbeddingCollection(tables=[EmbeddingConfig(
    ...     name="t_item", embedding_dim=8, num_embeddings=100, feature_names=["item", "history"])])
    >>> features = KeyedJaggedTensor(  # two rows: the candidate item, then a history of 2 and of 0 items
    ...     keys=["item", "history"], values=torch.tensor([5, 7, 3, 9]), lengths=torch.tensor([1, 1, 2, 0]))
    >>> looked_up = ec(features)
    >>> query = looked_up["item"].values()  # [2, 8]: one ID per row
    >>> history = looked_up["history"].to_padded_dense(4)  # [2, 4, 8]
    >>> interest = DINAttention(8)(query, history, looked_up["history"].lengths())
    >>> interest.shape, bool(interest[1].abs().sum() == 0)  # the empty history's interest is zeros
    (torch.Size([2, 8]), True)
    >>> BSTEncoder(8, max_length=4)(query, history, looked_up["history"].lengths()).shape
    torch.Size([2, 8])
"""

# No "from __future__ import annotations": an export scripts SequenceLookups and InterestArch, and TorchScript
# reads their class annotations as types.
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

SEQUENCE_KINDS = ("none", "din", "bst")  # model.sequence.kind; none: every list pooled, no attention


def valid_positions(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """[B, max_length] bool: True at the first ``lengths[b]`` positions of row ``b`` (the history), False after
    (padding)."""
    positions = torch.arange(max_length, device=lengths.device)
    return positions.unsqueeze(0) < lengths.to(positions.dtype).unsqueeze(1)


class DINAttention(nn.Module):
    """DIN's activation unit: the interest in the candidate as a weighted sum of the history.

    Each history position ``k`` gets the weight ``w = MLP([q, k, q - k, q * k])`` (the MLP of ``layer_sizes``, ReLU,
    then one linear output), padded positions the weight 0, and the output is ``sum_l w_l k_l`` [B, D].

    Normalisation: off by default, as in the paper. DIN drops the softmax on purpose, so that the output's scale
    keeps how much of the history relates to the candidate (ten relevant clicks weigh more than one; a softmax
    would make both a convex mix of the history). The cost is an output whose norm grows with the history's
    length; ``softmax=True`` normalises the weights over the valid positions instead (an empty history then has no
    position to normalise over and gives zeros, like the unnormalised sum over nothing).

    Args:
        dim: the width ``D`` of the query and of each history position (they are compared elementwise).
        layer_sizes: the hidden sizes of the scoring MLP.
        softmax: normalise the weights over each row's valid positions.

    Example::

        >>> attention = DINAttention(4, layer_sizes=[8])
        >>> query, history = torch.randn(3, 4), torch.randn(3, 5, 4)
        >>> attention(query, history, torch.tensor([5, 2, 0])).shape
        torch.Size([3, 4])
    """

    def __init__(self, dim: int, layer_sizes: Sequence[int] = (64, 32), softmax: bool = False) -> None:
        super().__init__()
        if dim < 1 or not layer_sizes or min(layer_sizes) < 1:
            raise ValueError(f"DINAttention: dim {dim}, layer_sizes {list(layer_sizes)}; allowed: >= 1, sizes >= 1")
        self.dim, self.softmax = dim, softmax
        self.mlp = MLP(4 * dim, list(layer_sizes))
        self.score = nn.Linear(layer_sizes[-1], 1)

    def weights(self, query: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, L]: each position's weight in the output, 0 at padded positions."""
        q = query.unsqueeze(1).expand_as(history)
        scores = self.score(self.mlp(torch.cat([q, history, q - history, q * history], dim=-1))).squeeze(-1)
        valid = valid_positions(lengths, history.shape[1])
        if not self.softmax:
            # where, not a product: a padded position's score may be anything, NaN included, and contributes 0
            return torch.where(valid, scores, torch.zeros_like(scores))
        weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=1)
        return torch.where(valid, weights, torch.zeros_like(weights))  # an empty row: softmax of all -inf is NaN

    def forward(self, query: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """query [B, D], history [B, L, D], lengths [B] -> interest [B, D]."""
        weights = self.weights(query, history, lengths)
        valid = valid_positions(lengths, history.shape[1]).unsqueeze(-1)
        history = torch.where(valid, history, torch.zeros_like(history))  # padding that holds NaN stays out too
        return torch.bmm(weights.unsqueeze(1), history).squeeze(1)


class BSTEncoder(nn.Module):
    """BST: a transformer over the history followed by the target; the target position's output.

    The sequence is ``[k_1, ..., k_n, q]`` (the history oldest first, as ``keep: last`` writes it, then the
    candidate), plus a learned embedding of each position's distance from the target (the target 0, the most
    recent item 1, ...): rows of different lengths then agree on what "the last click" is, which they would not with
    positions counted from the start of a history padded at its end. Padded positions are masked as keys
    (``src_key_padding_mask``), so no position attends to them; the target is never masked, so every row, an empty
    history's too, attends to at least itself and the output is finite.

    Args:
        dim: the width ``D`` of the query and of each history position (the transformer's ``d_model``).
        max_length: the most history positions ``L`` (the position table has ``L + 1`` rows).
        num_heads, num_layers, dropout: the ``TransformerEncoder``'s; ``num_heads`` must divide ``dim``.
        feedforward_dim: the width of each layer's feed-forward part (default ``4 * dim``).

    Example::

        >>> encoder = BSTEncoder(8, max_length=5, num_heads=2)
        >>> encoder(torch.randn(3, 8), torch.randn(3, 5, 8), torch.tensor([5, 1, 0])).shape
        torch.Size([3, 8])
    """

    def __init__(
        self,
        dim: int,
        max_length: int,
        num_heads: int = 2,
        num_layers: int = 1,
        dropout: float = 0.0,
        feedforward_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if dim < 1 or max_length < 1 or num_heads < 1 or num_layers < 1 or dim % num_heads:
            raise ValueError(
                f"BSTEncoder: dim {dim}, max_length {max_length}, num_heads {num_heads}, num_layers {num_layers}; "
                f"allowed: all >= 1 and num_heads dividing dim"
            )
        self.max_length = max_length
        self.positions = nn.Embedding(max_length + 1, dim)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, feedforward_dim or 4 * dim, dropout, batch_first=True
        )
        # no nested-tensor fast path: the same computation in training and evaluation (and no warning about it)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, query: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """query [B, D], history [B, L, D] (L <= max_length), lengths [B] -> the target's output [B, D]."""
        length = history.shape[1]
        if length > self.max_length:
            raise ValueError(f"BSTEncoder: history of {length} positions, built for at most {self.max_length}")
        valid = valid_positions(lengths, length)
        steps = torch.arange(length, device=history.device).unsqueeze(0)
        # distance from the target: n - l for the n valid positions; padding gets 0 (masked: never read)
        distance = (lengths.to(steps.dtype).unsqueeze(1) - steps).clamp(min=0)
        history = torch.where(valid.unsqueeze(-1), history, torch.zeros_like(history))  # NaN padding stays out too
        sequence = torch.cat([history + self.positions(distance), (query + self.positions.weight[0]).unsqueeze(1)], 1)
        padding = torch.cat([~valid, torch.zeros_like(valid[:, :1])], dim=1)  # True: not attended to
        return self.encoder(sequence, src_key_padding_mask=padding)[:, -1]


class InterestArch(nn.Module):
    """The configured attention (``kind``: din or bst) over the sequence features' columns side by side (width
    ``num_features * embedding_dim``), projected to one embedding of ``embedding_dim`` (a linear map; none with one
    feature) so that the interaction takes it as one more embedding, like the item text."""

    def __init__(
        self,
        kind: str,
        num_features: int,
        embedding_dim: int,
        max_length: int,
        attention_layer_sizes: Sequence[int] = (64, 32),
        num_heads: int = 2,
        num_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        width = num_features * embedding_dim
        if kind == "din":
            self.attention: nn.Module = DINAttention(width, attention_layer_sizes)
        elif kind == "bst":
            self.attention = BSTEncoder(width, max_length, num_heads, num_layers, dropout)
        else:
            raise ValueError(f"model.sequence.kind: {kind!r}; allowed here: din, bst")
        self.projection: nn.Module = nn.Linear(width, embedding_dim) if num_features > 1 else nn.Identity()

    def forward(self, query: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.projection(self.attention(query, history, lengths))


class SequenceLookups(nn.Module):
    """An EmbeddingBagCollection's and an EmbeddingCollection's outputs -> what the model and ``InterestArch`` read:
    ``(embeddings [B, F, D] of the non-sequence features in order, history [B, L, S * D], lengths [B],
    query [B, S * D])`` for the S sequence features and their queries.

    A feature of an unpooled table (torchrec_mtl.embedding_tables) reads its vector from the EmbeddingCollection: a
    single-ID feature its one ID's, a list that is not a sequence feature its IDs' mean or sum (as the bag would).
    Sequence features must hold as many IDs as each other in every row (they are aligned position by position):
    otherwise a ValueError naming them. A module of its own, holding no table, so that TorchRec's pipeline tracer
    takes it as a leaf and runs the checks here on real tensors.

    Args:
        feature_names: the non-sequence features, in the order of the output's embeddings.
        unpooled_features: those of them whose table is in the EmbeddingCollection.
        poolings: ``sum`` or ``mean`` for each list among ``unpooled_features``.
        sequence_features: the sequence features, in the order their columns are laid side by side.
        queries: the feature each sequence feature is compared with (the single-ID column it shares).
        max_length: ``L``, every sequence feature's ``max_length``.
    """

    feature_names: List[str]
    unpooled_features: List[str]
    poolings: Dict[str, str]
    sequence_features: List[str]
    queries: List[str]

    def __init__(
        self,
        feature_names: Sequence[str],
        unpooled_features: Sequence[str],
        poolings: Mapping[str, str],
        sequence_features: Sequence[str],
        queries: Sequence[str],
        max_length: int,
    ) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.unpooled_features = list(unpooled_features)
        self.poolings = dict(poolings)
        self.sequence_features = list(sequence_features)
        self.queries = list(queries)
        self.max_length = max_length

    def _vector(self, looked_up: JaggedTensor, feature: str) -> torch.Tensor:
        """[B, D] of a non-sequence feature of an unpooled table."""
        if feature not in self.poolings:
            return looked_up.values()  # a single ID: one vector a row, in row order
        lengths = looked_up.lengths()
        longest = max(int(lengths.max().item()) if lengths.numel() else 0, 1)
        summed = looked_up.to_padded_dense(longest).sum(dim=1)  # padding is zeros
        if self.poolings[feature] == "sum":
            return summed
        return summed / lengths.clamp(min=1).unsqueeze(1).to(summed.dtype)  # an empty list: zeros, as a bag's mean

    def forward(
        self, pooled: Optional[KeyedTensor], unpooled: Dict[str, JaggedTensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # A sharded collection returns a LazyAwaitable of its output: items() and to_dict() wait for it.
        unpooled = dict(unpooled.items())
        bags = pooled.to_dict() if pooled is not None else {}
        columns = [
            self._vector(unpooled[f], f) if f in self.unpooled_features else bags[f] for f in self.feature_names
        ]
        first = unpooled[self.sequence_features[0]]
        lengths = first.lengths()
        for feature in self.sequence_features[1:]:
            other = unpooled[feature].lengths()
            if not torch.equal(other, lengths):  # one host sync a batch, with two sequence features or more
                rows = (other != lengths).nonzero().flatten()
                row = int(rows[0])
                raise ValueError(
                    f"model.sequence.features: '{self.sequence_features[0]}' and '{feature}' are aligned position "
                    f"by position but hold different lengths in {rows.numel()} row(s) of this batch (row {row}: "
                    f"{int(lengths[row])} and {int(other[row])}); give every row as many of each"
                )
        history = torch.cat([unpooled[f].to_padded_dense(self.max_length) for f in self.sequence_features], dim=-1)
        query = torch.cat([unpooled[f].values() for f in self.queries], dim=-1)
        # never empty: each query is a non-sequence feature
        return torch.stack(columns, dim=1), history, lengths, query
