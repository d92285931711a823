"""The rows of the item-text table: every item of an items file, its cached vector, and the lookup from raw item keys.

The vectors are standardised per dimension over the items with text (zero mean, unit variance): sentence
embeddings share a large common component (MiniLM's mean-pooled vectors: norm ~5.8, per-dimension spread ~0.2 around
offsets ~0.16), which would otherwise swamp the projection's input with one direction every item has. Row 0, all
zeros, is then the average item.

The table's row space is the items file (``item_id``, ``description``), not the training log: an item that never
appears in training (a cold item) still has its row and its description's vector. Row ``1 + i`` holds the i-th item
of the file; row 0 is the fallback (all zeros) for a key that is not in the file, an empty key, or an item whose
description is empty. Item IDs are read with the dataset's categorical format (hex or decimal), the same rule that
gives the raw keys kept in the shards (torchrec_mtl.data.preprocess), so the two meet on integers.

Example::

    >>> table = ItemTextTable.load("runs/data/synthetic/items.tsv", "runs/data/synthetic/item_text.npz", "hex")  # doctest: +SKIP
    >>> table.rows(np.array([0x3B216CA4, -1]))  # doctest: +SKIP
    array([1, 0], dtype=int32)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import polars as pl

from torchrec_mtl.text.cache import ItemTextCache, TextCacheError


@dataclass
class ItemTextTable:
    """``vectors`` [1 + n, dim] float32 (row 0 zeros), ``has_text`` [1 + n] bool, and the sorted raw item keys with
    their rows for ``rows``."""

    vectors: np.ndarray
    has_text: np.ndarray
    sorted_keys: np.ndarray
    sorted_rows: np.ndarray
    descriptions: List[str]  # per row, row 0 ""

    @property
    def num_items(self) -> int:
        return self.vectors.shape[0] - 1

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """The table row of each raw item key (int32); 0 for a key not in the items file."""
        keys = np.asarray(keys, dtype=np.int64)
        if not len(self.sorted_keys):
            return np.zeros(keys.shape, dtype=np.int32)
        position = np.clip(np.searchsorted(self.sorted_keys, keys), 0, len(self.sorted_keys) - 1)
        return np.where(self.sorted_keys[position] == keys, self.sorted_rows[position], 0).astype(np.int32)

    @classmethod
    def load(cls, items_path: str | Path, cache_path: str | Path, categorical_format: str = "hex") -> "ItemTextTable":
        """The table for ``items_path`` with vectors from the cache at ``cache_path`` (bring it up to date first with
        torchrec_mtl.text.cache.encode_items_file), standardised. Items without a cached vector get zeros."""
        ids, descriptions = read_items(items_path)
        keys = parse_item_keys(ids, categorical_format, items_path)
        if not Path(cache_path).exists():
            raise TextCacheError(f"{cache_path}: no item-text cache; run `torchrec-mtl encode-items` first")
        vectors, has_text = ItemTextCache(cache_path).vectors(ids)
        dim = vectors.shape[1] if vectors.ndim == 2 and vectors.shape[1] else 0
        if not dim:
            raise TextCacheError(f"{cache_path}: the cache holds no vectors for the items of {items_path}")
        if has_text.any():
            mean, std = vectors[has_text].mean(axis=0), vectors[has_text].std(axis=0)
            vectors = np.where(has_text[:, None], (vectors - mean) / np.maximum(std, 1e-6), 0.0).astype(np.float32)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        repeated = sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]]
        if len(repeated):
            raise ValueError(
                f"{items_path}: item_id {ids[int(order[np.searchsorted(sorted_keys, repeated[0])])]!r} "
                f"appears more than once"
            )
        return cls(
            vectors=np.concatenate([np.zeros((1, dim), np.float32), vectors]),
            has_text=np.concatenate([[False], has_text]),
            sorted_keys=sorted_keys,
            sorted_rows=(order + 1).astype(np.int32),
            descriptions=["", *descriptions],
        )


def read_items(items_path: str | Path) -> Tuple[List[str], List[str]]:
    """The ``item_id`` and ``description`` columns of an items file, as strings in file order ("" if empty)."""
    try:
        frame = pl.read_csv(items_path, separator="\t", infer_schema=False, columns=["item_id", "description"])
    except pl.exceptions.ColumnNotFoundError:
        raise ValueError(f"{items_path}: expected item_id and description columns in the header") from None
    except (OSError, pl.exceptions.PolarsError) as error:
        raise ValueError(f"{items_path}: cannot read the items file ({error})") from None
    return frame["item_id"].to_list(), frame["description"].fill_null("").to_list()


def parse_item_keys(ids: list, categorical_format: str, source: str | Path = "items") -> np.ndarray:
    """Item IDs as the integers preprocessing gives their column (hex or decimal); a bad ID names its line."""
    base = 16 if categorical_format == "hex" else 10
    keys = np.empty(len(ids), dtype=np.int64)
    for i, item_id in enumerate(ids):
        try:
            keys[i] = int(str(item_id).strip(), base)
            if keys[i] < 0:
                raise ValueError
        except (ValueError, OverflowError):
            raise ValueError(
                f"{source}:{i + 2}: item_id {item_id!r} is not a {categorical_format} id like the log's item column"
            ) from None
    return keys
