"""Vocabularies of the ``min_count`` features: token counts over the training split, and token -> embedding row.

A vocabulary is the sorted array of the tokens kept; the token at position i is row i + 1, and row 0 is shared by
missing, rare and unseen tokens.

Example::

    >>> tokens_to_rows(np.array([7, 3, 5, -1]), np.array([3, 7]))
    array([2, 1, 0, 0], dtype=int32)
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np
import polars as pl

from torchrec_mtl.data.preprocess.parse import MISSING_TOKEN


class TokenCounter:
    """Token counts of the ``min_count`` vocabularies over the training split, merged now and then to bound memory.

    A vocabulary is named by the column that owns it; it counts that column's tokens and those of the list columns
    that share it (each occurrence once)."""

    def __init__(self, features: List[str]) -> None:
        self.features = features
        self.pending: Dict[str, List[pl.DataFrame]] = {f: [] for f in features}

    def count(self, tokens: Mapping[str, Sequence[np.ndarray]]) -> List[pl.DataFrame]:
        """Counts of each vocabulary's tokens in ``tokens`` (vocabulary -> 1-D token arrays; thread-safe: runs
        beside parsing)."""
        counts = []
        for feature in self.features:
            arrays = tokens.get(feature, [])
            values = np.concatenate(arrays) if len(arrays) else np.zeros(0, dtype=np.int64)
            counts.append(
                pl.DataFrame({"token": values.astype(np.int64, copy=False)})
                .filter(pl.col("token") != MISSING_TOKEN)
                .group_by("token")
                .len()
            )
        return counts

    def add(self, counts: List[pl.DataFrame]) -> None:
        for feature, frame in zip(self.features, counts, strict=True):
            self.pending[feature].append(frame)
            if len(self.pending[feature]) >= 16:
                self.pending[feature] = [self._merge(feature)]

    def _merge(self, feature: str) -> pl.DataFrame:
        frames = self.pending[feature]
        if not frames:
            return pl.DataFrame({"token": [], "len": []}, schema={"token": pl.Int64, "len": pl.UInt32})
        return pl.concat(frames).group_by("token").agg(pl.col("len").sum())

    def vocabulary(self, feature: str, min_count: int) -> np.ndarray:
        counts = self._merge(feature)
        return np.sort(counts.filter(pl.col("len") >= min_count).get_column("token").to_numpy())


def tokens_to_rows(tokens: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """Row of each token in ``vocabulary`` (sorted): position + 1, or 0 for missing, rare and unseen tokens."""
    position = np.searchsorted(vocabulary, tokens)
    found = position < len(vocabulary)
    found[found] &= vocabulary[position[found]] == tokens[found]
    return np.where(found, position + 1, 0).astype(np.int32)
