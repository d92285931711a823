"""Item text as one more embedding: a TorchRec table of cached BERT vectors, then a learned projection.

Each row of the table holds one item's description vector (encoded once, torchrec_mtl.text); the batch carries the
row of each example's item under the feature ``ITEM_TEXT_FEATURE``. The table is an ordinary EmbeddingBagCollection,
so DistributedModelParallel's planner shards it like the ID tables. Row 0 is the fallback for an item without text
(or one missing from the items file): all zeros, so the projection gives its bias alone.

Frozen by default: the looked-up vectors are detached, so no gradient reaches the table and the fused embedding
optimizer never changes it (the vectors stay BERT's). ``trainable=True`` lets the fused optimizer tune them.

Example::

    >>> arch = ItemTextArch(item_text_collection(num_items=100, text_dim=384), out_features=16)
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["item_text"], torch.tensor([3, 0]), torch.ones(2, dtype=torch.int32))
    >>> arch(kjt).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

ITEM_TEXT_FEATURE = "item_text"
ITEM_TEXT_TABLE = "t_item_text"


def item_text_collection(
    num_items: int, text_dim: int, device: torch.device = torch.device("meta")
) -> EmbeddingBagCollection:
    """One table of ``1 + num_items`` rows (row 0: no text) and ``text_dim`` columns, read by ``ITEM_TEXT_FEATURE``."""
    table = EmbeddingBagConfig(
        name=ITEM_TEXT_TABLE,
        embedding_dim=text_dim,
        num_embeddings=1 + num_items,
        feature_names=[ITEM_TEXT_FEATURE],
        pooling=PoolingType.SUM,  # one row per example: the sum is the row
    )
    return EmbeddingBagCollection(tables=[table], device=device)


def mix_rows(vectors: torch.Tensor, mix: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Each row's vector moved towards its partner's: ``v + w (v[partner] - v)`` for ``mix = (partner [B] rows of
    this batch, w [B])`` (text mixing, torchrec_mtl.data.augment); a row with w = 0 keeps its vector exactly."""
    if mix is None:
        return vectors
    partner, weight = mix
    return vectors + weight.to(vectors.dtype).unsqueeze(1) * (vectors[partner] - vectors)


def projection(in_features: int, hidden_layer_sizes: Sequence[int], out_features: int) -> nn.Sequential:
    """Text vector -> embedding: Linear layers with ReLU between them and a linear output (it may be negative, like
    the ID embeddings beside it)."""
    sizes = [in_features, *hidden_layer_sizes, out_features]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class ItemTextArch(nn.Module):
    """Cached item-text vectors -> [B, out_features].

    Args:
        embedding_bag_collection: the text table (``item_text_collection``).
        out_features: width of the output (the ID embeddings' dim, so the text vector interacts with them).
        hidden_layer_sizes: hidden sizes of the projection MLP (ReLU between layers; the output is linear).
        trainable: let the fused optimizer change the vectors (default: frozen).
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        out_features: int,
        hidden_layer_sizes: Sequence[int] = (64,),
        trainable: bool = False,
    ) -> None:
        super().__init__()
        tables = embedding_bag_collection.embedding_bag_configs()
        if len(tables) != 1 or tables[0].feature_names != [ITEM_TEXT_FEATURE]:
            raise ValueError(f"expected one table read by the feature {ITEM_TEXT_FEATURE!r}, got {tables}")
        self.embedding_bag_collection = embedding_bag_collection
        self.trainable = trainable
        self.projection = projection(tables[0].embedding_dim, hidden_layer_sizes, out_features)
        # fp16 training of a trainable table: unscales the gradient reaching it (torchrec_mtl.precision)
        self.gradient_unscale: Optional[nn.Module] = None

    def forward(
        self, features: KeyedJaggedTensor, mix: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    ) -> torch.Tensor:
        """[B, out_features]; ``mix`` (training only): mix each row's looked-up vector with a partner's first."""
        vectors = self.embedding_bag_collection(features)[ITEM_TEXT_FEATURE]
        if not self.trainable:
            vectors = vectors.detach()
        elif self.gradient_unscale is not None:
            vectors = self.gradient_unscale(vectors)
        return self.projection(mix_rows(vectors, mix))


class EncodedItemTextArch(nn.Module):
    """Item text encoded by a BERT inside the forward pass, instead of looked up: each batch's descriptions run through
    the model, whose top ``trainable_layers`` layers are fine-tuned end to end with the rest of the model (for users
    with GPUs), then the same projection as ``ItemTextArch``.

    The descriptions are tokenised once, at construction (``token_ids`` / ``attention_mask`` [1 + items, L], row 0
    the empty text), so the forward pass only gathers rows. Its rows are addressed like the text table's, by
    ``ITEM_TEXT_FEATURE``. ``unique=True`` encodes each distinct item of a batch once.

    Args:
        bert: a transformers BERT-family model (``AutoModel``); its embeddings and lower layers stay frozen.
        token_ids, attention_mask: the tokenised descriptions, one row per text-table row.
        out_features, hidden_layer_sizes: as ``ItemTextArch``.
        trainable_layers: how many of the top encoder layers train (0: the whole BERT is frozen).
        unique: encode each distinct item of a batch once (False: every row, the naive online baseline).

    Example::

        >>> arch = EncodedItemTextArch(bert, ids, mask, out_features=16, trainable_layers=1)  # doctest: +SKIP
    """

    def __init__(
        self,
        bert: nn.Module,
        token_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        out_features: int,
        hidden_layer_sizes: Sequence[int] = (64,),
        trainable_layers: int = 0,
        unique: bool = True,
    ) -> None:
        super().__init__()
        layers = bert.encoder.layer
        if not 0 <= trainable_layers <= len(layers):
            raise ValueError(f"trainable_layers: {trainable_layers}; the model has {len(layers)} layers")
        self.bert = bert
        for parameter in bert.parameters():
            parameter.requires_grad_(False)
        for layer in layers[len(layers) - trainable_layers :]:
            for parameter in layer.parameters():
                parameter.requires_grad_(True)
        self.trainable_layers = trainable_layers
        self.unique = unique
        self.register_buffer("token_ids", token_ids.long(), persistent=False)
        self.register_buffer("attention_mask", attention_mask.long(), persistent=False)
        self.projection = projection(bert.config.hidden_size, hidden_layer_sizes, out_features)

    def encode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Mean-pooled BERT vectors [len(rows), hidden] of the given text-table rows."""
        ids, mask = self.token_ids[rows], self.attention_mask[rows]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable_layers > 0):
            hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def forward(
        self, features: KeyedJaggedTensor, mix: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    ) -> torch.Tensor:
        rows = features[ITEM_TEXT_FEATURE].values()
        if self.unique:
            distinct, inverse = torch.unique(rows, return_inverse=True)
            vectors = self.encode_rows(distinct)[inverse]
        else:
            vectors = self.encode_rows(rows)
        return self.projection(mix_rows(vectors, mix))


def tokenize_descriptions(tokenizer, descriptions: Sequence[str], max_length: int = 64) -> tuple:
    """``(token_ids, attention_mask)`` [1 + len(descriptions), L] for ``EncodedItemTextArch``: row 0 the empty text."""
    encoded = tokenizer(["", *descriptions], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]
