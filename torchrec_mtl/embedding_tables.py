"""Which embedding table each categorical feature looks up: the one place that knows.

A single-ID feature ``f`` has a table of its own, ``t_f``. A list column (``lists`` in the schema,
torchrec_mtl.schema.ListSpec) that ``shares`` column ``c`` looks up ``c``'s table ``t_c``, since its tokens went
through ``c``'s vocabulary; any other list has a table of its own. A table pools the way its lists say (``sum`` or
``mean``; a single ID pools to itself either way), ``sum`` (torchrec's default) when no list looks it up.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from torchrec_mtl.schema import ListSpec

TABLE_PREFIX = "t_"
NO_LISTS: Mapping[str, ListSpec] = {}


@dataclass(frozen=True)
class EmbeddingTable:
    """One table: its name, rows, the features that look it up (owner first) and its pooling."""

    name: str
    rows: int
    features: Tuple[str, ...]
    pooling: str  # "sum" or "mean"


def table_owner(feature: str, lists: Mapping[str, ListSpec] = NO_LISTS) -> str:
    """The feature whose table ``feature`` looks up: the column a list shares, else the feature itself."""
    spec = lists.get(feature)
    return spec.shares if spec is not None and spec.shares is not None else feature


def table_of(feature: str, lists: Mapping[str, ListSpec] = NO_LISTS) -> str:
    """The name of the table ``feature`` looks up (``t_<owner>``)."""
    return TABLE_PREFIX + table_owner(feature, lists)


def embedding_tables(table_sizes: Mapping[str, int], lists: Mapping[str, ListSpec] = NO_LISTS) -> List[EmbeddingTable]:
    """The tables of the features ``table_sizes`` names (feature -> rows of the table it looks up), in the order
    of their owners' first appearance; ValueError when a list shares a column that is not among them or whose size
    differs from the list's."""
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
        EmbeddingTable(TABLE_PREFIX + owner, table_sizes[owner], tuple(names), pooling.get(owner) or "sum")
        for owner, names in features.items()
    ]
