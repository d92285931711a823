"""Which embedding table each categorical feature looks up: the one place that knows.

A single-ID feature ``f`` has a table of its own, ``t_f``. A list column (``lists`` in the schema,
torchrec_mtl.schema.ListSpec) that ``shares`` column ``c`` looks up ``c``'s table ``t_c``, since its tokens went
through ``c``'s vocabulary; any other list has a table of its own. A table pools the way its lists say (``sum`` or
``mean``; a single ID pools to itself either way), ``sum`` (torchrec's default) when no list looks it up.

A table that a sequence feature looks up (``model.sequence.features``: attended over position by position rather than
pooled, torchrec_mtl.modules.sequence) is ``unpooled``: it lives in the model's torchrec ``EmbeddingCollection``,
which returns every ID's vector, and every other feature of it (the single-ID column the sequence shares, the
candidate's query) reads its vector from there too, so the clicked item's embedding is the candidate's. Every other
table is ``pooled``, in the ``EmbeddingBagCollection``.

Everything that names a table from a feature (the model, per-table optimizers and sharding options, the checkpoints'
weights) asks here.

Example::

    >>> from torchrec_mtl.schema import ListSpec
    >>> lists = {"history": ListSpec(separator="|", max_length=20, shares="item")}
    >>> table_of("history", lists), table_of("user", lists)
    ('t_item', 't_user')
    >>> tables = embedding_tables({"user": 9, "item": 50, "history": 50}, lists)
    >>> [(t.name, t.features, t.rows, t.pooling) for t in tables]
    [('t_user', ('user',), 9, 'sum'), ('t_item', ('item', 'history'), 50, 'mean')]
    >>> [t.collection for t in embedding_tables({"user": 9, "item": 50, "history": 50}, lists, ["history"])]
    ['pooled', 'unpooled']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from torchrec_mtl.schema import ListSpec

TABLE_PREFIX = "t_"
NO_LISTS: Mapping[str, ListSpec] = {}
POOLED, UNPOOLED = "pooled", "unpooled"  # the collection a table lives in: EmbeddingBagCollection, EmbeddingCollection


@dataclass(frozen=True)
class EmbeddingTable:
    """One table: its name, rows, the features that look it up (owner first), its pooling and its collection
    (``POOLED``: the EmbeddingBagCollection; ``UNPOOLED``: the EmbeddingCollection, for a table a sequence feature
    looks up)."""

    name: str
    rows: int
    features: Tuple[str, ...]
    pooling: str  # "sum" or "mean"; in an unpooled table, how a list that is not a sequence feature pools
    collection: str = POOLED


def table_owner(feature: str, lists: Mapping[str, ListSpec] = NO_LISTS) -> str:
    """The feature whose table ``feature`` looks up: the column a list shares, else the feature itself."""
    spec = lists.get(feature)
    return spec.shares if spec is not None and spec.shares is not None else feature


def table_of(feature: str, lists: Mapping[str, ListSpec] = NO_LISTS) -> str:
    """The name of the table ``feature`` looks up (``t_<owner>``)."""
    return TABLE_PREFIX + table_owner(feature, lists)


def embedding_tables(
    table_sizes: Mapping[str, int],
    lists: Mapping[str, ListSpec] = NO_LISTS,
    sequence_features: Sequence[str] = (),
) -> List[EmbeddingTable]:
    """The tables of the features ``table_sizes`` names (feature -> rows of the table it looks up), in the order
    of their owners' first appearance, those ``sequence_features`` look up unpooled; ValueError when a list shares a
    column that is not among them or whose size differs from the list's."""
    unpooled = {table_owner(feature, lists) for feature in sequence_features}
    features: Dict[str, List[str]] = {}
    pooling: Dict[str, Optional[str]] = {}
    for feature in table_sizes:
        owner = table_owner(feature, lists)
        if owner not in table_sizes:
            raise ValueError(f"feature {feature!r} shares the table of {owner!r}, which is not a feature here")
        if table_sizes[feature] != table_sizes[owner]:
            raise ValueError(f"feature {feature!r} has {table_sizes[feature]} rows, the table of {owner!r} it "
                             f"shares {table_sizes[owner]}")  # fmt: skip
        features.setdefault(owner, [])
        if feature == owner:
            features[owner].insert(0, feature)
        else:
            features[owner].append(feature)
        if feature in lists:
            pooling[owner] = pooling.get(owner) or lists[feature].pooling
    return [
        EmbeddingTable(
            TABLE_PREFIX + owner, table_sizes[owner], tuple(names), pooling.get(owner) or "sum",
            UNPOOLED if owner in unpooled else POOLED,
        )  # fmt: skip
        for owner, names in features.items()
    ]
