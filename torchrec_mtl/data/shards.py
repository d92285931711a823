"""Preprocessed logs on disk: the shards and metadata written by torchrec_mtl.data.preprocess, memory-mapped.

Example::

    >>> log = ShardedLog.open("runs/data/synthetic/shards")  # doctest: +SKIP
    >>> train = log.split("train")  # doctest: +SKIP
    >>> len(train), train[0].dense.shape, log.table_sizes["C2"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from torchrec_mtl.data.preprocess import FORMAT_VERSION


class ShardError(ValueError):
    """A shard folder or file that cannot be used; the message names it."""


@dataclass
class EncodedLog:
    """Rows as arrays: ``dense`` [N, D] float32, ``sparse`` [N, C] integer rows, ``labels`` name -> [N] float32
    (NaN = missing), ``keys`` column -> [N] int64 raw identity tokens (-1 = empty; user/item IDs, when the schema
    declares them). In memory or memory-mapped."""

    dense: np.ndarray
    sparse: np.ndarray
    labels: Dict[str, np.ndarray]
    keys: Dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.dense.shape[0]

    def take(self, rows: np.ndarray) -> "EncodedLog":
        return EncodedLog(
            self.dense[rows],
            self.sparse[rows],
            {k: v[rows] for k, v in self.labels.items()},
            {k: v[rows] for k, v in self.keys.items()},
        )

    def with_sparse(self, sparse: np.ndarray) -> "EncodedLog":
        """The same rows with other sparse columns (e.g. an extra lookup feature appended)."""
        if sparse.shape[0] != len(self):
            raise ValueError(f"sparse has {sparse.shape[0]} rows, the log {len(self)}")
        return EncodedLog(self.dense, sparse, self.labels, self.keys)

    @staticmethod
    def concat(parts: Sequence["EncodedLog"]) -> "EncodedLog":
        if len(parts) == 1:
            part = parts[0]
            keys = {k: np.asarray(v) for k, v in part.keys.items()}
            return EncodedLog(np.asarray(part.dense), np.asarray(part.sparse), dict(part.labels), keys)
        return EncodedLog(
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.sparse for p in parts]),
            {k: np.concatenate([p.labels[k] for p in parts]) for k in parts[0].labels},
            {k: np.concatenate([p.keys[k] for p in parts]) for k in parts[0].keys},
        )


class ShardedLog:
    """The metadata of a preprocessed folder, and its splits as lists of memory-mapped shards."""

    def __init__(self, root: Path, metadata: Dict) -> None:
        self.root, self.metadata = root, metadata

    @classmethod
    def open(cls, root: str | os.PathLike) -> "ShardedLog":
        root = Path(root)
        path = root / "metadata.json"
        if not path.exists():
            partial = root.with_name(root.name + ".partial")
            hint = f" ({partial} exists: preprocessing stopped before the end)" if partial.exists() else ""
            raise ShardError(f"{root}: no metadata.json; not a preprocessed folder{hint}")
        try:
            metadata = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ShardError(f"{path}: corrupt metadata ({error})") from None
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ShardError(
                f"{path}: format version {metadata.get('format_version')}, this code reads {FORMAT_VERSION}; "
                f"preprocess again"
            )
        return cls(root, metadata)

    @property
    def categorical_features(self) -> List[str]:
        return self.metadata["categorical_features"]

    @property
    def dense_features(self) -> List[str]:
        return self.metadata["dense_features"]

    @property
    def label_kinds(self) -> Dict[str, str]:
        return self.metadata["labels"]

    @property
    def key_columns(self) -> List[str]:
        return self.metadata["key_columns"]

    @property
    def table_sizes(self) -> Dict[str, int]:
        return self.metadata["table_sizes"]

    @property
    def splits(self) -> List[str]:
        return list(self.metadata["splits"])

    def rows(self, split: str) -> int:
        return self._split_meta(split)["rows"]

    def label_mean(self, split: str, label: str) -> Optional[float]:
        return self._split_meta(split)["label_means"][label]

    def _split_meta(self, split: str) -> Dict:
        if split not in self.metadata["splits"]:
            raise ShardError(f"{self.root}: no split {split!r}; it has {self.splits}")
        return self.metadata["splits"][split]

    def split(self, split: str) -> List[EncodedLog]:
        """The split's shards, memory-mapped, in written order; each checked against the metadata."""
        labels = list(self.label_kinds)
        shards = []
        for shard in self._split_meta(split)["shards"]:
            arrays = {}
            parts = [
                ("dense", len(self.dense_features)),
                ("sparse", len(self.categorical_features)),
                ("labels", len(labels)),
            ]
            if self.key_columns:
                parts.append(("keys", len(self.key_columns)))
            for part, width in parts:
                path = self.root / split / f"{shard['name']}.{part}.npy"
                try:
                    array = np.load(path, mmap_mode="r")
                except (OSError, ValueError) as error:
                    raise ShardError(f"{path}: unreadable shard ({error}); preprocess again") from None
                if array.shape != (shard["rows"], width):
                    raise ShardError(
                        f"{path}: shape {array.shape}, metadata says ({shard['rows']}, {width}); preprocess again"
                    )
                arrays[part] = array
            shards.append(
                EncodedLog(
                    arrays["dense"],
                    arrays["sparse"],
                    {n: arrays["labels"][:, i] for i, n in enumerate(labels)},
                    {n: arrays["keys"][:, i] for i, n in enumerate(self.key_columns)},
                )
            )
        return shards
