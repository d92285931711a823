"""The model a config describes, built the same way for training (then sharded) and for serving (then loaded from a
checkpoint): the embedding tables, the tower (looked up by name in ``TOWERS``), the item-text arch and the two-tower
retrieval arch.

Example::

    >>> model = build_model(config.model, num_dense=13, table_sizes={"C1": 1000, "C2": 500})  # doctest: +SKIP
    >>> lists = {"history": ListSpec(separator="|", max_length=50, shares="C2")}  # history looks up t_C2, mean-pooled
    >>> model = build_model(config.model, 13, {"C1": 1000, "C2": 500, "history": 500}, lists=lists)  # doctest: +SKIP
    >>> config.model.sequence = SequenceConfig(kind="din", features=["history"])  # t_C2 unpooled, DIN over history
    >>> model = build_model(config.model, 13, {"C1": 1000, "C2": 500, "history": 500}, lists=lists)  # doctest: +SKIP
"""

from __future__ import annotations

import random
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from torchrec_mtl.config import JobConfig, ModelConfig, SequenceConfig, TextConfig, TowerConfig
from torchrec_mtl.data.shards import EncodedLog
from torchrec_mtl.embedding_tables import NO_LISTS, POOLED, UNPOOLED, EmbeddingTable, embedding_tables
from torchrec_mtl.model import MultiTaskModel
from torchrec_mtl.modules.interactions import INTERACTIONS
from torchrec_mtl.modules.sequence import InterestArch, SequenceLookups
from torchrec_mtl.modules.item_text import (
    EncodedItemTextArch,
    ItemTextArch,
    item_text_collection,
    tokenize_descriptions,
)
from torchrec_mtl.modules.towers import TOWERS
from torchrec_mtl.modules.two_tower import InBatchSoftmax, TwoTowerArch
from torchrec_mtl.schema import ListSpec
from torchrec_mtl.tasks import TOWER_TASKS
from torchrec_mtl.text.table import ItemTextTable


POOLINGS = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}  # a list's ``pooling`` as torchrec's


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(
    config: ModelConfig,
    num_dense: int,
    table_sizes: Dict[str, int],
    device: torch.device = torch.device("meta"),
    task_names: Optional[List[str]] = None,
    item_text: Optional[torch.nn.Module] = None,
    retrieval_features: Optional[Tuple[List[str], List[str]]] = None,
    lists: Mapping[str, ListSpec] = NO_LISTS,
) -> MultiTaskModel:
    """The embedding tables of the categorical features (``table_sizes``: feature -> rows of the table it looks
    up; ``lists``: which of them are list columns, pooled and maybe sharing a table, as torchrec_mtl.embedding_tables
    lays out) under the configured tower, one pooled vector per feature in ``table_sizes`` order, with ``item_text``
    (``build_item_text``) as one more embedding when given, and with ``retrieval_features`` (the user and the item
    tower's features) the two-tower arch of ``config.retrieval``.

    With ``config.sequence`` (kind din or bst) the tables its features look up are unpooled, in an
    EmbeddingCollection; the embeddings are then one per non-sequence feature in ``table_sizes`` order and the
    interest vector (``build_sequence``). With kind none the model is what it was without the key."""
    sequence = config.sequence
    attended = list(sequence.features) if sequence.kind != "none" else []
    tables = embedding_tables(table_sizes, lists, attended)
    pooled = [
        EmbeddingBagConfig(
            name=table.name,
            embedding_dim=config.embedding_dim,
            num_embeddings=table.rows,
            feature_names=list(table.features),
            pooling=POOLINGS[table.pooling],
        )
        for table in tables
        if table.collection == POOLED
    ]
    features = [f for f in table_sizes if f not in attended]  # the embeddings' features, in order
    interaction = build_interaction(config, len(features) + bool(attended) + (item_text is not None), num_dense)
    tower = build_tower(config.tower, interaction.out_features, task_names or TOWER_TASKS)
    two_tower = None
    if retrieval_features is not None:
        columns = [[features.index(feature) for feature in side] for side in retrieval_features]
        r = config.retrieval
        two_tower = TwoTowerArch(*columns, config.embedding_dim, item_text is not None, r.layer_sizes, r.dim)
    if not attended:
        ebc = EmbeddingBagCollection(tables=pooled, device=device)
        return MultiTaskModel(
            ebc, num_dense, config.dense_arch_layer_sizes, tower, item_text, two_tower, interaction, features
        )
    ec, lookups, interest = build_sequence(sequence, config.embedding_dim, tables, features, lists, device)
    ebc = EmbeddingBagCollection(tables=pooled, device=device) if pooled else None
    return MultiTaskModel(
        ebc, num_dense, config.dense_arch_layer_sizes, tower, item_text, two_tower, interaction, None, ec, lookups,
        interest,
    )  # fmt: skip


def build_sequence(
    config: SequenceConfig,
    embedding_dim: int,
    tables: List[EmbeddingTable],
    features: List[str],
    lists: Mapping[str, ListSpec],
    device: torch.device = torch.device("meta"),
) -> Tuple[EmbeddingCollection, SequenceLookups, InterestArch]:
    """The parts of ``config.features``' attention: the EmbeddingCollection of the unpooled ``tables``, how the
    lookups are read (``features``: the non-sequence features in order) and the configured attention. ValueError
    naming the key when a sequence feature is no list sharing a column, or the features' max_length differ
    (torchrec_mtl.config.check says the same before any work)."""
    queries = []
    for feature in config.features:
        spec = lists.get(feature)
        if spec is None or spec.shares is None:
            raise ValueError(f"model.sequence.features: {feature!r} is not a list column sharing a single-ID column")
        queries.append(spec.shares)
    lengths = {lists[feature].max_length for feature in config.features}
    if len(lengths) != 1:
        raise ValueError(f"model.sequence.features: {config.features} have different max_length ({sorted(lengths)})")
    unpooled_tables = [table for table in tables if table.collection == UNPOOLED]
    ec = EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name=table.name, embedding_dim=embedding_dim, num_embeddings=table.rows,
                feature_names=list(table.features),
            )  # fmt: skip
            for table in unpooled_tables
        ],
        device=device,
    )
    unpooled = [f for table in unpooled_tables for f in table.features if f in features]
    lookups = SequenceLookups(
        features, unpooled, {f: lists[f].pooling for f in unpooled if f in lists}, config.features, queries,
        lengths.pop(),
    )  # fmt: skip
    interest = InterestArch(
        config.kind, len(config.features), embedding_dim, lookups.max_length, config.attention_layer_sizes,
        config.num_heads, config.num_layers, config.dropout,
    )  # fmt: skip
    return ec, lookups, interest


def build_item_text(
    config: TextConfig, embedding_dim: int, table: ItemTextTable, device: torch.device = torch.device("meta")
) -> torch.nn.Module:
    """The item-text arch: the frozen (or tuned) table of cached vectors, or (``online``, ``finetune_layers``) the
    BERT itself run on each batch's descriptions, its top ``finetune_layers`` layers trained."""
    if not config.online and config.finetune_layers == 0:
        return build_cached_item_text(config, embedding_dim, table.num_items, table.dim, device)
    from torchrec_mtl.text.encoder import TextEncoder

    encoder = TextEncoder(config.encoder, pooling=config.pooling)
    token_ids, attention_mask = tokenize_descriptions(encoder.tokenizer, table.descriptions[1:])
    return EncodedItemTextArch(
        encoder.model.train(),
        token_ids,
        attention_mask,
        embedding_dim,
        config.projection_layer_sizes,
        trainable_layers=config.finetune_layers,
    )


def build_cached_item_text(
    config: TextConfig, embedding_dim: int, num_items: int, dim: int, device: torch.device = torch.device("meta")
) -> ItemTextArch:
    """The item-text arch over a table of ``num_items`` cached vectors of width ``dim`` (rows filled from the cache
    in training, from the checkpoint in serving), projected to ``embedding_dim``."""
    collection = item_text_collection(num_items, dim, device)
    return ItemTextArch(collection, embedding_dim, config.projection_layer_sizes, trainable=config.trainable)


def build_interaction(config: ModelConfig, num_embeddings: int, num_dense: int) -> torch.nn.Module:
    """The configured interaction (``INTERACTIONS[config.interaction.kind]``) over the dense output (the dense arch's
    last layer, or the ``num_dense`` raw features without a dense arch) and ``num_embeddings`` embeddings of
    ``config.embedding_dim``."""
    kind = config.interaction.kind
    if kind not in INTERACTIONS:
        raise ValueError(f"model.interaction.kind: {kind!r}; allowed: {', '.join(INTERACTIONS)}")
    sizes = config.dense_arch_layer_sizes
    dense_width = sizes[-1] if sizes else num_dense
    return INTERACTIONS[kind].from_config(config.interaction, num_embeddings, config.embedding_dim, dense_width)


def build_tower(config: TowerConfig, in_features: int, task_names: List[str]) -> torch.nn.Module:
    """The configured tower over ``in_features`` inputs with one logit per task: ``TOWERS[config.kind]``'s
    ``from_config``; an unknown kind is a ValueError naming the known ones."""
    if config.kind not in TOWERS:
        raise ValueError(f"model.tower.kind: {config.kind!r}; allowed: {', '.join(sorted(TOWERS))}")
    return TOWERS[config.kind].from_config(config, in_features, task_names)


def build_retrieval_loss(
    config: JobConfig,
    label: str,
    train_shards: List[EncodedLog],
    features: List[str],
    two_tower_features: Tuple[List[str], List[str]],
    table_sizes: Dict[str, int],
) -> Tuple[InBatchSoftmax, str]:
    """The retrieval task's loss, its popularity correction counted over the training split's positive rows (the
    in-batch candidates), and the item feature it reads (the item tower's first, a single-ID feature)."""
    item_feature = two_tower_features[1][0]
    lists = train_shards[0].lists if train_shards else {}
    column = [f for f in features if f not in lists].index(item_feature)  # among the sparse (single-ID) columns
    num_rows = table_sizes[item_feature]
    counts = np.zeros(num_rows, dtype=np.int64)
    for shard in train_shards:
        positive = shard.labels[label] == 1
        counts += np.bincount(shard.sparse[positive, column], minlength=num_rows)
    r = config.model.retrieval
    return InBatchSoftmax(torch.from_numpy(counts), r.temperature, r.popularity_correction), item_feature
